//! The application: the shared state every handler sees ([`App`]) and
//! `pns serve`, which opens the store, starts the background tasks and both
//! listeners, and shuts them down in order.

use crate::config::{Config, SessionKey};
use crate::hub::Hub;
use crate::ingest::Ingest;
use crate::limits::RateLimiter;
use crate::metrics::Metrics;
use crate::opaque::OpaqueSessions;
use crate::registry::SessionRegistry;
use crate::runs_to_end::RunsToEnd;
use crate::scheduler::DelayScheduler;
use crate::server::Listeners;
use crate::session::{SessionValidator, VerifyKey};
use crate::shutdown::Shutdown;
use crate::store::{OpaqueSession, SharedStore, StoreResult};
use anyhow::Context;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

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
    /// Who polls this node: for the session list and `sessions_active`.
    pub registry: SessionRegistry,
    pub opaque: OpaqueSessions,
    /// The heads of polls' answers written where their news is committed.
    pub poll_heads: crate::http::PollHeads,
    pub session_limits: RateLimiter<String>,
    pub address_limits: RateLimiter<IpAddr>,
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
        let metrics = Arc::new(Metrics::new(store.sync_times()));
        let store: SharedStore = Arc::new(crate::store::Metered::new(
            store,
            metrics.store_errors.clone(),
        ));
        match sessions.load_from(&store, crate::clock::now_ms()).await {
            Ok(()) => {}
            // A shared store may be away at start; its feed's first Resync
            // loads the revocations once it is back.
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "revocations not loaded yet: the store is unreachable")
            }
            Err(e) => return Err(e.into()),
        }
        let hub = Hub::with_user_cap(config.limits.max_polls_per_user);
        // On the runtime of the polls: App is built there.
        tokio::spawn(hub.clone().relay_wakes());
        let scheduler = DelayScheduler::new();
        let ingest = Ingest::new(
            store.clone(),
            hub.clone(),
            scheduler.clone(),
            metrics.clone(),
        );
        let registry = SessionRegistry::new(
            config.limits.max_tracked_sessions,
            2 * config.hold + crate::registry::IDLE_MARGIN,
        );
        let session_limits = RateLimiter::new(config.limits.session_polls, crate::limits::MAX_KEYS);
        let address_limits = RateLimiter::new(config.limits.address_polls, crate::limits::MAX_KEYS);
        let opaque = OpaqueSessions::new(store.clone());
        let poll_heads = crate::http::PollHeads::new(&config.allowed_origins).await;
        Ok(Arc::new(App {
            poll_heads,
            config,
            registry,
            opaque,
            session_limits,
            address_limits,
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
    ///
    /// Runs to its end even if the caller stops waiting: a revocation the
    /// store has taken is enforced here too ([`RunsToEnd`]).
    pub async fn revoke_session(self: &Arc<Self>, jti: &str, expires_ms: i64) -> StoreResult<()> {
        let (app, jti) = (self.clone(), jti.to_owned());
        RunsToEnd::new(async move {
            app.store.revoke_session(&jti, expires_ms).await?;
            app.sessions.note_revoked_session(&jti, expires_ms);
            app.hub.revoke_session(&jti);
            app.registry.forget_session(&jti);
            Ok(())
        })
        .await
    }

    /// Revoke every session of `user` that started until now; runs to its
    /// end as [`App::revoke_session`] does.
    pub async fn revoke_user(self: &Arc<Self>, user: &str) -> StoreResult<()> {
        let (app, user) = (self.clone(), user.to_owned());
        RunsToEnd::new(async move {
            let now = crate::clock::now_ms();
            app.store.revoke_mailbox(&user, now).await?;
            app.sessions.note_revoked_mailbox(&user, now);
            app.hub.revoke_user(&user);
            app.registry.forget_user(&user);
            Ok(())
        })
        .await
    }

    /// Register the opaque `sid` for `user` for `ttl_secs`; returns its
    /// hash and the session as stored. Runs to its end as
    /// [`App::revoke_session`] does: a registration the store has taken
    /// also drops what this node cached of the sid (a poll just before it
    /// may have cached "unknown").
    pub async fn register_opaque_session(
        self: &Arc<Self>,
        sid: &str,
        user: &str,
        ttl_secs: u64,
    ) -> StoreResult<(String, OpaqueSession)> {
        let (app, sid, user) = (self.clone(), sid.to_owned(), user.to_owned());
        RunsToEnd::new(async move {
            let now = crate::clock::now_ms();
            app.opaque.register(&sid, &user, ttl_secs, now).await
        })
        .await
    }

    /// Delete an opaque session by its sid hash: refused from now on (on
    /// this node at once), its held polls answered 401; runs to its end as
    /// [`App::revoke_session`] does.
    pub async fn delete_opaque_session(self: &Arc<Self>, sid_hash: &str) -> StoreResult<bool> {
        let (app, sid_hash) = (self.clone(), sid_hash.to_owned());
        RunsToEnd::new(async move {
            let existed = app.opaque.delete(&sid_hash).await?;
            app.hub.revoke_session(&sid_hash);
            app.registry.forget_session(&sid_hash);
            Ok(existed)
        })
        .await
    }

    /// Drop what has gone stale from the in-memory tables.
    fn sweep(&self) {
        self.registry.sweep(crate::clock::now_ms());
        let now = std::time::Instant::now();
        self.session_limits.sweep(now);
        self.address_limits.sweep(now);
        self.opaque.sweep();
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
    let started_ms = crate::clock::now_ms();
    let shutdown = Shutdown::new();
    let signalled = crate::shutdown::signals();
    // A restart's clients, reconnecting all at once, wait in the kernel's
    // queues for their turn, not a second for their SYN to be sent again.
    let max_connections = connection_limit();
    let public = crate::server::bind_spread(config.listen, max_connections)
        .with_context(|| format!("cannot listen on {} (PNS_LISTEN)", config.listen))?;
    let internal = crate::server::bind(config.internal_listen).with_context(|| {
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
        app.metrics.clone(),
        app.config.retention,
        app.config.retention_every,
        shutdown.clone(),
    ));
    if let Some(maildir) = app.config.maildir.clone() {
        tasks.spawn(crate::ingest::maildir::run(
            maildir,
            app.ingest.clone(),
            started_ms,
            shutdown.clone(),
        ));
    }
    tasks.spawn(sweep_now_and_then(app.clone(), shutdown.clone()));
    let limits = &app.config.limits;
    tasks.spawn(crate::server::serve(
        public,
        crate::http::public_router(app.clone()),
        Some(Arc::new(crate::http::DirectPoll::new(app.clone()))),
        crate::server::ConnLimits {
            max_connections,
            header_timeout: limits.header_timeout,
            max_head_bytes: Some(
                crate::server::PUBLIC_MAX_HEAD_BYTES.max(limits.max_url_bytes + 16 * 1024),
            ),
        },
        crate::server::Front::Bodiless,
        shutdown.clone(),
    ));
    tasks.spawn(crate::threads::on_ingest_thread(crate::server::serve(
        internal,
        crate::http::internal_router(app.clone()),
        Some(Arc::new(crate::http::DirectNotify::new(app.clone()))),
        crate::server::ConnLimits {
            max_connections: 4096,
            header_timeout: limits.header_timeout,
            max_head_bytes: None,
        },
        crate::server::Front::DirectBodies,
        shutdown.clone(),
    ))?);

    // A listener that cannot go on stops the node too.
    tokio::select! {
        _ = signalled => {}
        _ = shutdown.wait() => {}
    }
    shutdown.trigger();
    app.hub.shut_down();
    while tasks.join_next().await.is_some() {}
    if let Err(e) = app.store.flush().await {
        tracing::error!(error = %e, "cannot write out the session positions");
    }
    tracing::info!("stopped");
    Ok(())
}

/// How often the in-memory tables are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

async fn sweep_now_and_then(app: Arc<App>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => app.sweep(),
            _ = shutdown.wait() => return,
        }
    }
}

/// The start-up lines: where the node listens, and for a newcomer how to try it.
fn announce(app: &App, public: &Listeners, internal: &Listeners) {
    let sockets = public.sockets();
    let public = public
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let internal = internal
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(%public, %internal, store = %redact_url(&app.config.database_url), public_sockets = sockets, "pns listening");
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

/// A node on an SQLite store in `dir`, for tests of the parts that need
/// one whole.
#[cfg(test)]
pub async fn for_tests(dir: &std::path::Path) -> Arc<App> {
    let settings = crate::config::Settings {
        database_url: Some(format!("sqlite://{}/pns.db", dir.display())),
        jwt_secret: Some("a secret of more than thirty-two bytes".into()),
        ..crate::config::Settings::default()
    };
    let config = Config::resolve(settings, None).expect("a valid test config");
    App::new(config, Shutdown::new())
        .await
        .expect("a node on a new store")
}
