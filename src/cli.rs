//! The `pns` command line: `serve`, `token`, `notify`, `migrate`.

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
            let token = config
                .internal_tokens
                .first()
                .map(String::as_str)
                .unwrap_or_default();
            let (status, text) = post_json(
                config.internal_listen,
                "/internal/v1/notify",
                token,
                &body.to_string(),
            )
            .await?;
            if status != 202 {
                bail!("the node answered {status}: {text}");
            }
            println!("{text}");
            Ok(())
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

/// One POST to the internal listener; the CLI's only HTTP need.
async fn post_json(
    addr: std::net::SocketAddr,
    path: &str,
    token: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("cannot reach the internal listener at {addr}: is `pns serve` running?")
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(bytes::Bytes::from(body.to_owned())))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let text = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}
