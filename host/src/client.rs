//! The CLI's HTTP client for a running host (or a Dapr sidecar, whose publish
//! API has the same shape).

use std::time::Duration;

use anyhow::{Context, bail};

use crate::dead_letter::DeadLetter;

/// Publishing from the CLI is one request; a host that does not answer in
/// this time is reported as down rather than waited for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().context("building the HTTP client")
}

pub async fn publish(base_url: &str, pubsub: &str, topic: &str, body: Vec<u8>, content_type: &str) -> anyhow::Result<()> {
    let url = format!("{}/v1.0/publish/{pubsub}/{topic}", base_url.trim_end_matches('/'));
    let response = http()?
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .body(body)
        .send()
        .await
        .with_context(|| format!("publishing to {url} (is `wasmsub run` or daprd listening there?)"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        bail!("publishing to {url} was refused with {status}: {text}");
    }
    tracing::info!(%topic, %pubsub, "published");
    Ok(())
}

pub async fn print_dead_letters(base_url: &str) -> anyhow::Result<()> {
    let url = format!("{}/wasmsub/dead-letters", base_url.trim_end_matches('/'));
    let response = http()?.get(&url).send().await.with_context(|| format!("reading {url} (is `wasmsub run` listening there?)"))?;
    let status = response.status();
    if !status.is_success() {
        bail!("reading {url} failed with {status}");
    }
    let entries: Vec<DeadLetter> = response.json().await.with_context(|| format!("decoding the answer of {url}"))?;
    if entries.is_empty() {
        println!("no dead letters");
    }
    for entry in entries {
        println!(
            "{at}  {tenant}/{handler}  event {id} on {topic} -> {dlt} after {attempts} attempt(s): {reason}",
            at = entry.at,
            tenant = entry.tenant,
            handler = entry.handler,
            id = entry.event_id,
            topic = entry.topic,
            dlt = entry.dead_letter_topic,
            attempts = entry.attempts,
            reason = entry.reason,
        );
    }
    Ok(())
}
