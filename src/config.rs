//! Configuration: a TOML file, then environment variables, then flags, later
//! ones overriding earlier ones (names as in SPEC.md). Secrets that are not
//! configured are generated once and kept, mode 0600, in the data directory.

use crate::ingest::maildir::{MaildirConfig, Pattern};
use anyhow::{bail, Context};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The public listener's default address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The internal listener's default address.
pub const DEFAULT_INTERNAL_LISTEN: &str = "127.0.0.1:8081";
/// The embedded default store.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/pns.db";
/// How long a poll is held by default, and at most.
pub const DEFAULT_HOLD_SECS: u64 = 30;
pub const MAX_HOLD_SECS: u64 = 110;
/// Retention defaults: per user the newest 500 messages, none older than 7 days.
pub const DEFAULT_RETENTION_MAX_MESSAGES: u32 = 500;
pub const DEFAULT_RETENTION_MAX_AGE_SECS: u64 = 7 * 24 * 3600;
/// Polls held at once per user by default; a further poll releases the oldest.
pub const DEFAULT_MAX_POLLS_PER_USER: usize = 10;
/// Poll rate per session by default: sustained polls per second, and burst.
/// A client polling every 500 ms uses 2 a second.
pub const DEFAULT_SESSION_POLL_RATE: f64 = 5.0;
pub const DEFAULT_SESSION_POLL_BURST: u32 = 20;
/// Poll rate per client address by default; many users may share one
/// address behind a NAT, so this is much higher than the per-session one.
pub const DEFAULT_ADDRESS_POLL_RATE: f64 = 100.0;
pub const DEFAULT_ADDRESS_POLL_BURST: u32 = 400;
/// A request's headers must arrive within this time, on both listeners.
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
/// An internal API request body must arrive within this time.
pub const DEFAULT_BODY_TIMEOUT_SECS: u64 = 10;
/// Internal API request bodies larger than this are refused with 413.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Public request targets (path and query) longer than this are refused with 414.
pub const DEFAULT_MAX_URL_BYTES: usize = 8 * 1024;
/// Sessions the in-memory session registry tracks at most.
pub const DEFAULT_MAX_TRACKED_SESSIONS: usize = 100_000;
/// The user the demo page signs in as.
pub const DEMO_USER: &str = "demo@example.com";

/// Every setting, each optional so that the sources can be layered.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
#[command(next_help_heading = "Settings (also PNS_* environment variables and the config file)")]
pub struct Settings {
    /// Public listener, for browsers.
    #[arg(long, env = "PNS_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Internal listener, for delivery agents and operators.
    #[arg(long, env = "PNS_INTERNAL_LISTEN", value_name = "ADDR")]
    pub internal_listen: Option<SocketAddr>,
    /// sqlite://path (default sqlite://data/pns.db) or postgres://…
    #[arg(long, env = "PNS_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// Where generated secrets are kept (default: the SQLite file's folder, or ./data).
    #[arg(long, env = "PNS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// HS256 secret for session tokens (generated when unset).
    #[arg(
        long,
        env = "PNS_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// PEM public key (EdDSA or RS256) to check session tokens with, instead of a secret.
    #[arg(long, env = "PNS_JWT_PUBLIC_KEY_FILE", value_name = "FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `aud` of session tokens (unset: not checked).
    #[arg(long, env = "PNS_JWT_AUDIENCE", value_name = "AUD")]
    pub jwt_audience: Option<String>,
    /// Bearer token(s) for the internal API, comma-separated (generated when unset).
    #[arg(
        long,
        env = "PNS_INTERNAL_TOKEN",
        value_name = "TOKENS",
        hide_env_values = true
    )]
    pub internal_token: Option<String>,
    /// How long a poll is held at most, in seconds (cap 110).
    #[arg(long, env = "PNS_HOLD_SECS", value_name = "SECS")]
    pub hold_secs: Option<u64>,
    /// CORS origins of the webmail, comma-separated.
    #[arg(long, env = "PNS_ALLOWED_ORIGINS", value_name = "ORIGINS")]
    pub allowed_origins: Option<String>,
    /// Root of the Maildir tree to watch (enables the watcher).
    #[arg(long, env = "PNS_MAILDIR_ROOT", value_name = "DIR")]
    pub maildir_root: Option<PathBuf>,
    /// Where a mailbox's Maildir is below the root (default {domain}/{localpart}/Maildir).
    #[arg(long, env = "PNS_MAILDIR_PATTERN", value_name = "PATTERN")]
    pub maildir_pattern: Option<String>,
    /// Domain for mailboxes whose path gives only a local part.
    #[arg(long, env = "PNS_MAILDIR_DEFAULT_DOMAIN", value_name = "DOMAIN")]
    pub maildir_default_domain: Option<String>,
    /// Seconds between two full rescans of the Maildir tree (default 60).
    #[arg(long, env = "PNS_MAILDIR_RESCAN_SECS", value_name = "SECS")]
    pub maildir_rescan_secs: Option<u64>,
    /// User name Dovecot's push_notification driver authenticates with.
    #[arg(long, env = "PNS_DOVECOT_USER", value_name = "USER")]
    pub dovecot_user: Option<String>,
    /// Password Dovecot's push_notification driver authenticates with.
    #[arg(
        long,
        env = "PNS_DOVECOT_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub dovecot_password: Option<String>,
    /// Messages kept per user at most.
    #[arg(long, env = "PNS_RETENTION_MAX_MESSAGES", value_name = "N")]
    pub retention_max_messages: Option<u32>,
    /// Age after which messages are purged, in seconds.
    #[arg(long, env = "PNS_RETENTION_MAX_AGE_SECS", value_name = "SECS")]
    pub retention_max_age_secs: Option<u64>,
    /// How often the retention purge runs, in seconds.
    #[arg(long, env = "PNS_RETENTION_INTERVAL_SECS", value_name = "SECS")]
    pub retention_interval_secs: Option<u64>,
    /// Serve the demo session endpoint (default: on when no secret or key is configured).
    #[arg(long, env = "PNS_DEMO", value_name = "BOOL")]
    pub demo: Option<bool>,
    /// Reverse proxies whose X-Forwarded-For is believed: IPs or CIDRs, comma-separated.
    #[arg(long, env = "PNS_TRUSTED_PROXIES", value_name = "NETS")]
    pub trusted_proxies: Option<String>,
    /// Polls held at once per user; a further poll releases the user's oldest (default 10).
    #[arg(long, env = "PNS_MAX_POLLS_PER_USER", value_name = "N")]
    pub max_polls_per_user: Option<usize>,
    /// Polls a second one session may make, sustained (default 5; 0 = no limit).
    #[arg(long, env = "PNS_SESSION_POLL_RATE", value_name = "PER_SEC")]
    pub session_poll_rate: Option<f64>,
    /// Polls one session may make in a burst (default 20).
    #[arg(long, env = "PNS_SESSION_POLL_BURST", value_name = "N")]
    pub session_poll_burst: Option<u32>,
    /// Polls a second from one client address, sustained (default 100; 0 = no limit).
    #[arg(long, env = "PNS_ADDRESS_POLL_RATE", value_name = "PER_SEC")]
    pub address_poll_rate: Option<f64>,
    /// Polls from one client address in a burst (default 400).
    #[arg(long, env = "PNS_ADDRESS_POLL_BURST", value_name = "N")]
    pub address_poll_burst: Option<u32>,
    /// Seconds a client has to send a request's headers, on both listeners (default 10).
    #[arg(long, env = "PNS_HEADER_TIMEOUT_SECS", value_name = "SECS")]
    pub header_timeout_secs: Option<u64>,
    /// Seconds a client has to send an internal API request body (default 10).
    #[arg(long, env = "PNS_BODY_TIMEOUT_SECS", value_name = "SECS")]
    pub body_timeout_secs: Option<u64>,
    /// Largest internal API request body, in bytes (default 1048576).
    #[arg(long, env = "PNS_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Longest public request target (path and query), in bytes (default 8192).
    #[arg(long, env = "PNS_MAX_URL_BYTES", value_name = "BYTES")]
    pub max_url_bytes: Option<usize>,
    /// Sessions the in-memory session registry tracks at most (default 100000).
    #[arg(long, env = "PNS_MAX_TRACKED_SESSIONS", value_name = "N")]
    pub max_tracked_sessions: Option<usize>,
}

macro_rules! layer_fields {
    ($over:ident, $under:ident, $($f:ident),*) => {
        Settings { $($f: $over.$f.or($under.$f)),* }
    };
}

impl Settings {
    /// `self` wins over `under`, field by field.
    pub fn over(self, under: Settings) -> Settings {
        let over = self;
        layer_fields!(
            over,
            under,
            listen,
            internal_listen,
            database_url,
            data_dir,
            jwt_secret,
            jwt_public_key_file,
            jwt_audience,
            internal_token,
            hold_secs,
            allowed_origins,
            maildir_root,
            maildir_pattern,
            maildir_default_domain,
            maildir_rescan_secs,
            dovecot_user,
            dovecot_password,
            retention_max_messages,
            retention_max_age_secs,
            retention_interval_secs,
            demo,
            trusted_proxies,
            max_polls_per_user,
            session_poll_rate,
            session_poll_burst,
            address_poll_rate,
            address_poll_burst,
            header_timeout_secs,
            body_timeout_secs,
            max_body_bytes,
            max_url_bytes,
            max_tracked_sessions
        )
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("config file {} is not valid", path.display()))
    }
}

/// Shortest password the Dovecot endpoint accepts to be configured with.
pub const MIN_DOVECOT_PASSWORD_LEN: usize = 16;

/// HTTP Basic credentials Dovecot's `push_notification` driver sends.
#[derive(Clone)]
pub struct DovecotCredentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for DovecotCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DovecotCredentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// How session tokens are checked.
#[derive(Debug, Clone)]
pub enum SessionKey {
    Secret(String),
    PublicKeyFile(PathBuf),
}

/// A token bucket's shape: `per_sec` sustained, `burst` at once. A rate of
/// zero turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: u32,
}

/// The abuse limits: request sizes, slow clients, poll rates.
#[derive(Debug, Clone)]
pub struct Limits {
    pub session_polls: Rate,
    pub address_polls: Rate,
    pub max_polls_per_user: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_url_bytes: usize,
    pub max_tracked_sessions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            session_polls: Rate {
                per_sec: DEFAULT_SESSION_POLL_RATE,
                burst: DEFAULT_SESSION_POLL_BURST,
            },
            address_polls: Rate {
                per_sec: DEFAULT_ADDRESS_POLL_RATE,
                burst: DEFAULT_ADDRESS_POLL_BURST,
            },
            max_polls_per_user: DEFAULT_MAX_POLLS_PER_USER,
            header_timeout: Duration::from_secs(DEFAULT_HEADER_TIMEOUT_SECS),
            body_timeout: Duration::from_secs(DEFAULT_BODY_TIMEOUT_SECS),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_url_bytes: DEFAULT_MAX_URL_BYTES,
            max_tracked_sessions: DEFAULT_MAX_TRACKED_SESSIONS,
        }
    }
}

/// The resolved configuration `pns` runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub internal_listen: SocketAddr,
    pub database_url: String,
    pub data_dir: PathBuf,
    pub session_key: SessionKey,
    pub audience: Option<String>,
    pub internal_tokens: Vec<String>,
    pub hold: Duration,
    pub allowed_origins: Vec<String>,
    /// The Maildir watcher's settings, when `PNS_MAILDIR_ROOT` is set.
    pub maildir: Option<MaildirConfig>,
    /// The credentials of the Dovecot endpoint; without them it refuses all.
    pub dovecot: Option<DovecotCredentials>,
    pub retention: crate::store::RetentionPolicy,
    pub retention_every: Duration,
    pub demo: bool,
    /// Peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<crate::address::IpNet>,
    pub limits: Limits,
    /// Secret files generated by this start, to point the operator at.
    pub generated: Vec<PathBuf>,
}

impl Config {
    /// Layer `file` (if any) under `settings`, fill defaults, and load or
    /// generate secrets.
    pub fn resolve(settings: Settings, file: Option<&Path>) -> anyhow::Result<Config> {
        let settings = match file {
            Some(path) => settings.over(Settings::from_file(path)?),
            None => settings,
        };
        let limits = limits(&settings)?;
        let database_url = settings
            .database_url
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        let data_dir = match settings.data_dir {
            Some(d) => d,
            None if database_url.starts_with("sqlite:") => crate::store::sqlite_path(&database_url)
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
            None => PathBuf::from("data"),
        };
        let hold_secs = settings.hold_secs.unwrap_or(DEFAULT_HOLD_SECS);
        if hold_secs == 0 || hold_secs > MAX_HOLD_SECS {
            bail!("PNS_HOLD_SECS must be between 1 and {MAX_HOLD_SECS}, not {hold_secs}");
        }
        let mut generated = Vec::new();
        let configured_key =
            settings.jwt_secret.is_some() || settings.jwt_public_key_file.is_some();
        let session_key = match (settings.jwt_public_key_file, settings.jwt_secret) {
            (Some(path), _) => SessionKey::PublicKeyFile(path),
            (None, Some(secret)) => {
                if secret.len() < 32 {
                    bail!("PNS_JWT_SECRET must be at least 32 characters");
                }
                SessionKey::Secret(secret)
            }
            (None, None) => {
                SessionKey::Secret(kept_secret(&data_dir, "jwt_secret", &mut generated)?)
            }
        };
        let internal_tokens: Vec<String> = match settings.internal_token {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
            None => vec![kept_secret(&data_dir, "internal_token", &mut generated)?],
        };
        if internal_tokens.is_empty() {
            bail!("PNS_INTERNAL_TOKEN is set but holds no token");
        }
        if let Some(t) = internal_tokens.iter().find(|t| t.len() < 16) {
            bail!(
                "each PNS_INTERNAL_TOKEN must be at least 16 characters (one has {})",
                t.len()
            );
        }
        let maildir = match settings.maildir_root {
            None => None,
            Some(root) => {
                let pattern = Pattern::parse(
                    settings
                        .maildir_pattern
                        .as_deref()
                        .unwrap_or(crate::ingest::maildir::DEFAULT_PATTERN),
                )
                .map_err(|e| anyhow::anyhow!("PNS_MAILDIR_PATTERN: {e}"))?;
                let rescan = settings
                    .maildir_rescan_secs
                    .unwrap_or(crate::ingest::maildir::DEFAULT_RESCAN_SECS);
                if rescan == 0 {
                    bail!("PNS_MAILDIR_RESCAN_SECS must be at least 1");
                }
                let default_domain = settings
                    .maildir_default_domain
                    .map(|d| d.trim().trim_start_matches('@').to_owned())
                    .filter(|d| !d.is_empty());
                Some(MaildirConfig {
                    root,
                    pattern,
                    default_domain,
                    rescan: Duration::from_secs(rescan),
                    state_file: data_dir.join(crate::ingest::maildir::STATE_FILE),
                })
            }
        };
        let dovecot = match (settings.dovecot_user, settings.dovecot_password) {
            (None, None) => None,
            (Some(user), Some(password)) => {
                if user.is_empty() || user.contains(':') {
                    bail!("PNS_DOVECOT_USER must not be empty nor contain ':'");
                }
                if password.len() < MIN_DOVECOT_PASSWORD_LEN {
                    bail!(
                        "PNS_DOVECOT_PASSWORD must be at least {MIN_DOVECOT_PASSWORD_LEN} characters"
                    );
                }
                Some(DovecotCredentials { user, password })
            }
            (Some(_), None) => bail!("PNS_DOVECOT_USER is set but PNS_DOVECOT_PASSWORD is not"),
            (None, Some(_)) => bail!("PNS_DOVECOT_PASSWORD is set but PNS_DOVECOT_USER is not"),
        };
        let trusted_proxies = match &settings.trusted_proxies {
            Some(list) => crate::address::parse_nets(list)
                .map_err(|e| anyhow::anyhow!("PNS_TRUSTED_PROXIES: {e}"))?,
            None => Vec::new(),
        };
        let max_age = settings
            .retention_max_age_secs
            .unwrap_or(DEFAULT_RETENTION_MAX_AGE_SECS);
        Ok(Config {
            listen: settings
                .listen
                .unwrap_or_else(|| parse_addr(DEFAULT_LISTEN)),
            internal_listen: settings
                .internal_listen
                .unwrap_or_else(|| parse_addr(DEFAULT_INTERNAL_LISTEN)),
            database_url,
            data_dir,
            session_key,
            audience: settings.jwt_audience,
            internal_tokens,
            hold: Duration::from_secs(hold_secs),
            allowed_origins: settings
                .allowed_origins
                .map(|o| {
                    o.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            maildir,
            dovecot,
            retention: crate::store::RetentionPolicy {
                max_messages_per_user: settings
                    .retention_max_messages
                    .unwrap_or(DEFAULT_RETENTION_MAX_MESSAGES),
                max_age_ms: i64::try_from(max_age.saturating_mul(1000)).unwrap_or(i64::MAX),
            },
            retention_every: Duration::from_secs(
                settings.retention_interval_secs.unwrap_or(300).max(1),
            ),
            demo: settings.demo.unwrap_or(!configured_key),
            trusted_proxies,
            limits,
            generated,
        })
    }

    /// The HS256 secret, when sessions use one (needed to mint tokens).
    pub fn jwt_secret(&self) -> Option<&str> {
        match &self.session_key {
            SessionKey::Secret(s) => Some(s),
            SessionKey::PublicKeyFile(_) => None,
        }
    }
}

/// The limits from `settings`, each checked for a usable value.
fn limits(settings: &Settings) -> anyhow::Result<Limits> {
    let d = Limits::default();
    let rate = |name: &str, per_sec: Option<f64>, burst: Option<u32>, default: Rate| {
        let per_sec = per_sec.unwrap_or(default.per_sec);
        if !per_sec.is_finite() || per_sec < 0.0 {
            bail!(
                "PNS_{name}_POLL_RATE must be a number of polls a second, 0 or more, not {per_sec}"
            );
        }
        let burst = burst.unwrap_or(default.burst);
        if burst == 0 {
            bail!("PNS_{name}_POLL_BURST must be at least 1");
        }
        Ok(Rate { per_sec, burst })
    };
    let secs = |name: &str, v: Option<u64>, default: Duration| match v {
        None => Ok(default),
        Some(0) => bail!("{name} must be at least 1 second"),
        Some(s) => Ok(Duration::from_secs(s)),
    };
    let at_least = |name: &str, v: Option<usize>, default: usize, min: usize| match v {
        None => Ok(default),
        Some(n) if n < min => bail!("{name} must be at least {min}, not {n}"),
        Some(n) => Ok(n),
    };
    Ok(Limits {
        session_polls: rate(
            "SESSION",
            settings.session_poll_rate,
            settings.session_poll_burst,
            d.session_polls,
        )?,
        address_polls: rate(
            "ADDRESS",
            settings.address_poll_rate,
            settings.address_poll_burst,
            d.address_polls,
        )?,
        max_polls_per_user: at_least(
            "PNS_MAX_POLLS_PER_USER",
            settings.max_polls_per_user,
            d.max_polls_per_user,
            1,
        )?,
        header_timeout: secs(
            "PNS_HEADER_TIMEOUT_SECS",
            settings.header_timeout_secs,
            d.header_timeout,
        )?,
        body_timeout: secs(
            "PNS_BODY_TIMEOUT_SECS",
            settings.body_timeout_secs,
            d.body_timeout,
        )?,
        max_body_bytes: at_least(
            "PNS_MAX_BODY_BYTES",
            settings.max_body_bytes,
            d.max_body_bytes,
            1024,
        )?,
        max_url_bytes: at_least(
            "PNS_MAX_URL_BYTES",
            settings.max_url_bytes,
            d.max_url_bytes,
            256,
        )?,
        max_tracked_sessions: at_least(
            "PNS_MAX_TRACKED_SESSIONS",
            settings.max_tracked_sessions,
            d.max_tracked_sessions,
            1,
        )?,
    })
}

fn parse_addr(s: &str) -> SocketAddr {
    // The defaults are literals known to parse.
    s.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Read `data_dir/name`, or create it with a fresh random secret, mode 0600.
fn kept_secret(
    data_dir: &Path,
    name: &str,
    generated: &mut Vec<PathBuf>,
) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 32 => return Ok(s.trim().to_owned()),
        Ok(_) => bail!(
            "{} is too short to be a secret; delete it to have a new one generated",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let secret = {
        use base64::Engine;
        let bytes: [u8; 32] = rand::random();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(f, "{secret}")?;
    f.sync_all()?;
    generated.push(path);
    Ok(secret)
}

/// Parse a duration like `8h`, `30m`, `45s`, `7d` or plain seconds.
pub fn parse_ttl(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 8h, 30m or 3600"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
}
