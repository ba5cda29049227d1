//! The `pns` command line: `serve`, `token`, `notify`, `stats`, `migrate`.

use crate::config::{parse_ttl, Config, Settings};
use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// PNS pushes new-mail notifications to webmail browsers over long polls.
#[derive(Debug, Parser)]
#[command(name = "pns", version, about, long_about = None)]
#[command(
    after_help = "Start here:  pns serve   (SQLite under ./data, generated secrets, demo page on http://127.0.0.1:8080/)"
)]
pub struct Cli {
    /// Config file (TOML; keys are the settings' long names with underscores).
    #[arg(long, global = true, env = "PNS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: the public and internal listeners.
    Serve {
        #[command(flatten)]
        settings: Settings,
    },
    /// Mint a session token (sid) for a user, signed with the configured secret.
    Token {
        /// The mailbox address the session belongs to.
        #[arg(long)]
        user: String,
        /// How long the session lasts: 45s, 30m, 8h, 7d.
        #[arg(long, default_value = "8h", value_parser = parse_ttl)]
        ttl: i64,
        #[command(flatten)]
        settings: Settings,
    },
    /// Send a new-mail notification through a running node's internal API.
    Notify {
        /// The mailbox address to notify.
        #[arg(long)]
        user: String,
        /// The mail's subject.
        #[arg(long)]
        subject: String,
        /// The mail's sender.
        #[arg(long, default_value = "PNS <pns@localhost>")]
        from: String,
        /// A short text of the mail.
        #[arg(long, default_value = "")]
        snippet: String,
        #[command(flatten)]
        settings: Settings,
    },
    /// Show a running node's stats: sessions, polls, messages, latency.
    Stats {
        /// Refresh every 2 seconds until interrupted.
        #[arg(long)]
        watch: bool,
        /// Print the node's JSON as it is.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Copy a running node's SQLite store into a file, without stopping it.
    Backup {
        /// Where the copy goes (replaced if it exists).
        #[arg(long)]
        out: std::path::PathBuf,
        #[command(flatten)]
        settings: Settings,
    },
    /// Create or update the store's tables, then exit.
    Migrate {
        #[command(flatten)]
        settings: Settings,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let file = cli.config.as_deref();
    match cli.command {
        Command::Serve { settings } => crate::app::serve(Config::resolve(settings, file)?).await,
        Command::Token {
            user,
            ttl,
            settings,
        } => {
            let config = Config::resolve(settings, file)?;
            let Some(secret) = config.jwt_secret() else {
                bail!("sessions are checked with a public key here; mint them where the private key is");
            };
            println!(
                "{}",
                crate::session::mint(secret.as_bytes(), &user, ttl, config.audience.as_deref())?
            );
            Ok(())
        }
        Command::Notify {
            user,
            subject,
            from,
            snippet,
            settings,
        } => {
            let config = Config::resolve(settings, file)?;
            let body = serde_json::json!({
                "user": user,
                "type": crate::wire::TYPE_NEW_MAIL,
                "data": {"folder": "INBOX", "from": from, "subject": subject, "snippet": snippet, "unseen": 1},
            });
            let (status, text) = request(
                &config,
                hyper::Method::POST,
                "/internal/v1/notify",
                Some(&body.to_string()),
            )
            .await?;
            if status != 202 {
                bail!("the node answered {status}: {text}");
            }
            println!("{text}");
            Ok(())
        }
        Command::Stats {
            watch,
            json,
            settings,
        } => {
            let config = Config::resolve(settings, file)?;
            stats(&config, watch, json).await
        }
        Command::Backup { out, settings } => {
            let config = Config::resolve(settings, file)?;
            backup(&config, &out).await
        }
        Command::Migrate { settings } => {
            let config = Config::resolve(settings, file)?;
            crate::store::open(&config.database_url).await?;
            println!(
                "store at {} is up to date",
                crate::app::redact_url(&config.database_url)
            );
            Ok(())
        }
    }
}

/// An error and its causes for the operator, each said once: many errors
/// (thiserror's, sqlx's) put their cause in their own text and also give it
/// as their source, which `{:#}` then says again.
pub fn describe(e: &anyhow::Error) -> String {
    let mut said = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if said.ends_with(&text) {
            continue;
        }
        if !said.is_empty() {
            said.push_str(": ");
        }
        said.push_str(&text);
    }
    said
}

/// How often `pns stats --watch` refreshes.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// `pns stats`: fetch `/internal/v1/stats` and print it.
async fn stats(config: &Config, watch: bool, json: bool) -> anyhow::Result<()> {
    let addr = config.internal_listen;
    loop {
        let fetched = request(config, hyper::Method::GET, "/internal/v1/stats", None).await;
        let (status, text) = match fetched {
            Ok(answer) => answer,
            // A node restarting under --watch comes back; keep watching.
            Err(e) if watch => {
                print!(
                    "\x1b[2J\x1b[Hpns stats: {e:#}\n(retrying every {} s; Ctrl-C to stop)\n",
                    WATCH_EVERY.as_secs()
                );
                use std::io::Write;
                std::io::stdout().flush()?;
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_EVERY) => continue,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        };
        if status == 401 {
            return Err(token_refused(addr));
        }
        if status != 200 {
            bail!("the node answered {status}: {text}");
        }
        if json {
            println!("{text}");
            return Ok(());
        }
        let stats: crate::wire::Stats = serde_json::from_str(&text)
            .with_context(|| format!("the node's stats are not what this pns expects: {text}"))?;
        let summary = render_stats(&addr.to_string(), &stats);
        if !watch {
            print!("{summary}");
            return Ok(());
        }
        // Clear the screen and home the cursor, then draw.
        print!(
            "\x1b[2J\x1b[H{summary}\n(refreshing every {} s; Ctrl-C to stop)\n",
            WATCH_EVERY.as_secs()
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// The stats as aligned lines, for people.
pub fn render_stats(node: &str, s: &crate::wire::Stats) -> String {
    let ms = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
    // In the order a poll's life suggests, then any this pns does not know.
    let known = crate::metrics::Outcome::ALL.map(|o| o.as_str());
    let mut outcomes: Vec<(&String, &u64)> = s.poll_answers.iter().collect();
    outcomes.sort_by_key(|(k, _)| known.iter().position(|n| n == k).unwrap_or(known.len()));
    let answers = outcomes
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let limited = s
        .rate_limited
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut tags: Vec<(&String, &u64)> = s.come_from.iter().collect();
    tags.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let mut come_from = tags
        .iter()
        .take(5)
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    if tags.len() > 5 {
        come_from.push_str(&format!(", … ({} tags)", tags.len()));
    }
    if come_from.is_empty() {
        come_from.push('-');
    }
    let rows: Vec<(&str, String)> = vec![
        ("sessions active", s.sessions_active.to_string()),
        ("polls held", s.polls_held.to_string()),
        ("messages stored", s.messages_stored.to_string()),
        ("messages accepted", s.messages_accepted.to_string()),
        ("messages delivered", s.messages_delivered.to_string()),
        ("duplicates refused", s.duplicates.to_string()),
        (
            "delivery latency",
            format!(
                "p50 {}, p99 {} (over the last {} {})",
                ms(s.delivery_latency_ms.p50),
                ms(s.delivery_latency_ms.p99),
                s.delivery_latency_ms.samples,
                if s.delivery_latency_ms.samples == 1 {
                    "delivery"
                } else {
                    "deliveries"
                }
            ),
        ),
        ("poll answers", answers),
        ("rate limited", limited),
        ("store errors", s.store_errors.to_string()),
        ("comeFrom", come_from),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!(
        "pns {} at {node}, up {}, hold {} s\n",
        s.version,
        human_duration(s.uptime_secs),
        s.hold_secs
    );
    for (k, v) in rows {
        out.push_str(&format!("  {k:<width$}  {v}\n"));
    }
    out
}

fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// One request to the internal listener, its answer read whole.
async fn request(
    config: &Config,
    method: hyper::Method,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let response = send(config, method, path, body).await?;
    let status = response.status().as_u16();
    let text = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

/// A request to a running node's internal listener with the configured
/// token (the CLI's only HTTP need); the answer's body is the caller's to read.
async fn send(
    config: &Config,
    method: hyper::Method,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    use http_body_util::Full;
    let addr = config.internal_listen;
    let token = config
        .internal_tokens
        .first()
        .map(String::as_str)
        .unwrap_or_default();
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("cannot reach the internal listener at {addr}: is `pns serve` running?")
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {token}"));
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let request = builder.body(Full::new(bytes::Bytes::from(
        body.unwrap_or_default().to_owned(),
    )))?;
    Ok(sender.send_request(request).await?)
}

/// What to tell an operator whose token the node refused.
fn token_refused(addr: std::net::SocketAddr) -> anyhow::Error {
    anyhow::anyhow!("the node at {addr} refused the internal token: set PNS_INTERNAL_TOKEN (or --config) as for the node")
}

/// `pns backup`: stream `/internal/v1/backup` into `out`, through a file
/// beside it that replaces `out` only once the whole copy is on disk.
async fn backup(config: &Config, out: &std::path::Path) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    use std::io::Write;
    let response = send(config, hyper::Method::GET, "/internal/v1/backup", None).await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    if status != 200 {
        let text = body.collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&text);
        if status == 401 {
            return Err(token_refused(config.internal_listen));
        }
        bail!("the node answered {status}: {text}");
    }
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let written = async {
        let mut file = std::fs::File::create(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                file.write_all(&data)?;
                bytes += data.len() as u64;
            }
        }
        file.sync_all()?;
        std::fs::rename(&partial, out)
            .with_context(|| format!("cannot replace {}", out.display()))?;
        anyhow::Ok(bytes)
    }
    .await;
    match written {
        Ok(bytes) => {
            println!("backup of {bytes} bytes written to {}", out.display());
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e.context(format!("the backup to {} failed", out.display())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_says_each_cause_once() {
        let io = std::io::Error::other("cannot open the database data/pns.db: Permission denied");
        let store = crate::store::StoreError::Unavailable(sqlx::Error::Io(io));
        let e = anyhow::Error::new(store).context("cannot open the message store");
        assert_eq!(
            describe(&e),
            "cannot open the message store: store unavailable: error communicating with \
             database: cannot open the database data/pns.db: Permission denied"
        );
        // Causes not in their error's own text are all said.
        let e = anyhow::anyhow!("the root")
            .context("the middle")
            .context("the top");
        assert_eq!(describe(&e), "the top: the middle: the root");
    }
}
