//! The application: the shared state every handler sees ([`App`]) and
//! `pns serve`, which opens the store, starts the background tasks and both
//! listeners, and shuts them down in order.

use crate::config::{Config, SessionKey};
use crate::hub::Hub;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::scheduler::DelayScheduler;
use crate::session::{SessionValidator, VerifyKey};
use crate::shutdown::Shutdown;
use crate::store::{SharedStore, StoreResult};
use anyhow::Context;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Everything a request handler may need.
pub struct App {
    pub config: Config,
    pub store: SharedStore,
    pub hub: Arc<Hub>,
    pub sessions: Arc<SessionValidator>,
    pub ingest: Ingest,
    pub metrics: Arc<Metrics>,
    pub scheduler: Arc<DelayScheduler>,
    pub shutdown: Shutdown,
}

impl App {
    pub async fn new(config: Config, shutdown: Shutdown) -> anyhow::Result<Arc<App>> {
        let key = match &config.session_key {
            SessionKey::Secret(s) => VerifyKey::Secret(s.as_bytes().to_vec()),
            SessionKey::PublicKeyFile(path) => VerifyKey::PublicPem(
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
            ),
        };
        let sessions = Arc::new(SessionValidator::new(key, config.audience.as_deref())?);
        let store = crate::store::connect(&config.database_url)
            .await
            .context("cannot open the message store")?;
        match sessions.load_from(&store, crate::clock::now_ms()).await {
            Ok(()) => {}
            // A shared store may be away at start; its feed's first Resync
            // loads the revocations once it is back.
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "revocations not loaded yet: the store is unreachable")
            }
            Err(e) => return Err(e.into()),
        }
        let hub = Hub::new();
        let metrics = Arc::new(Metrics::new());
        let scheduler = DelayScheduler::new();
        let ingest = Ingest::new(
            store.clone(),
            hub.clone(),
            scheduler.clone(),
            metrics.clone(),
        );
        Ok(Arc::new(App {
            config,
            store,
            hub,
            sessions,
            ingest,
            metrics,
            scheduler,
            shutdown,
        }))
    }

    /// Revoke one session: refused from now until `expires_ms`, its held
    /// polls answered 401 at once.
    pub async fn revoke_session(&self, jti: &str, expires_ms: i64) -> StoreResult<()> {
        self.store.revoke_session(jti, expires_ms).await?;
        self.sessions.note_revoked_session(jti, expires_ms);
        self.hub.revoke_session(jti);
        Ok(())
    }

    /// Revoke every session of `user` that started until now.
    pub async fn revoke_user(&self, user: &str) -> StoreResult<()> {
        let now = crate::clock::now_ms();
        self.store.revoke_mailbox(user, now).await?;
        self.sessions.note_revoked_mailbox(user, now);
        self.hub.revoke_user(user);
        Ok(())
    }
}

/// How many connections each listener takes at most: what the open-file limit
/// leaves after a margin for the store, logs and the other listener.
pub fn connection_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    soft.saturating_sub(256).max(64)
}

/// Raise the soft open-file limit to the hard one: held polls are sockets.
pub fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `pns serve`: run until SIGTERM or SIGINT, then drain and return.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    raise_open_file_limit();
    let shutdown = Shutdown::new();
    let public = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (PNS_LISTEN)", config.listen))?;
    let internal = TcpListener::bind(config.internal_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (PNS_INTERNAL_LISTEN)",
                config.internal_listen
            )
        })?;
    let app = App::new(config, shutdown.clone()).await?;
    announce(&app, &public, &internal);

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(events) = app.store.events() {
        tasks.spawn(crate::cluster::follow(
            app.clone(),
            events,
            shutdown.clone(),
        ));
    }
    tasks.spawn(
        app.scheduler
            .clone()
            .run(app.store.clone(), app.hub.clone(), shutdown.clone()),
    );
    tasks.spawn(crate::retention::run(
        app.store.clone(),
        app.sessions.clone(),
        app.config.retention,
        app.config.retention_every,
        shutdown.clone(),
    ));
    let limit = connection_limit();
    tasks.spawn(crate::server::serve(
        public,
        crate::http::public_router(app.clone()),
        limit,
        shutdown.clone(),
    ));
    tasks.spawn(crate::server::serve(
        internal,
        crate::http::internal_router(app.clone()),
        4096,
        shutdown.clone(),
    ));

    crate::shutdown::signal().await;
    shutdown.trigger();
    app.hub.shut_down();
    while tasks.join_next().await.is_some() {}
    tracing::info!("stopped");
    Ok(())
}

/// The start-up lines: where the node listens, and for a newcomer how to try it.
fn announce(app: &App, public: &TcpListener, internal: &TcpListener) {
    let public = public
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let internal = internal
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(%public, %internal, store = %redact_url(&app.config.database_url), "pns listening");
    for path in &app.config.generated {
        tracing::info!(file = %path.display(), "generated a secret (mode 0600); keep it, or configure your own");
    }
    if !app.config.generated.is_empty() && !app.config.database_url.starts_with("sqlite:") {
        // Each node would generate its own: tokens minted for one are refused by the others.
        tracing::warn!("this store is shared by several nodes: set PNS_JWT_SECRET (or a public key) and PNS_INTERNAL_TOKEN to the same values on every node");
    }
    if app.config.demo {
        tracing::info!("demo mode: open http://{public}/ for the demo inbox");
        tracing::info!(
            "send it mail:   pns notify --user {} --subject 'Hello'",
            crate::config::DEMO_USER
        );
    }
    tracing::info!("mint a session: pns token --user alice@example.com --ttl 8h");
}

/// A database URL without its password, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
