//! The CLI's HTTP client for a running host (or a Dapr sidecar, whose publish
//! API has the same shape).

use std::time::Duration;

use anyhow::{Context, bail};

use crate::pipeline::dead_letter::DeadLetter;
use crate::text::printable;

/// Publishing from the CLI is one request; a host that does not answer in
/// this time is reported as down rather than waited for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().context("building the HTTP client")
}

/// Publishes `body` to `topic` through the publish API at `base_url`.
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
    println!("published to {pubsub}/{topic}");
    Ok(())
}

/// Prints the recent dead letters of the host at `base_url`.
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
            at = printable(&entry.at),
            tenant = printable(&entry.tenant),
            handler = printable(&entry.handler),
            id = printable(&entry.event_id),
            topic = printable(&entry.topic),
            dlt = printable(&entry.dead_letter_topic),
            attempts = entry.attempts,
            reason = printable(&entry.reason),
        );
    }
    Ok(())
}

async fn admin_call(request: reqwest::RequestBuilder, url: &str) -> anyhow::Result<serde_json::Value> {
    let response = request.send().await.with_context(|| format!("calling {url} (is `wasmsub run` listening there?)"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        let reason = body.get("error").and_then(|e| e.as_str()).unwrap_or("no reason given");
        bail!("{url} answered {status}: {}", printable(reason));
    }
    Ok(body)
}

fn print_change(verb: &str, change: &serde_json::Value) {
    let short = |v: &serde_json::Value| v.as_str().map(|s| s.chars().take(12).collect::<String>()).unwrap_or_default();
    let (from, to) = (short(&change["from"]), short(&change["to"]));
    let name = format!("{}/{}", change["tenant"].as_str().unwrap_or(""), change["handler"].as_str().unwrap_or(""));
    match (from.as_str(), to.as_str()) {
        ("", to) => println!("{verb} {name}: new handler, version {to}"),
        (from, to) if from == to => println!("{name}: version {to} is already serving; nothing changed"),
        (from, to) => println!("{verb} {name}: {from} -> {to}"),
    }
}

/// Deploys `component` as a handler's new version. `placement`:
/// `(pubsub, topic)` to create the handler for a (new) topic.
pub async fn deploy(base_url: &str, token: &str, tenant: &str, handler: &str, placement: Option<(String, String)>, component: Vec<u8>) -> anyhow::Result<()> {
    let url = format!("{}/admin/tenants/{tenant}/handlers/{handler}/component", base_url.trim_end_matches('/'));
    // Compiling a large component takes a while: allow more than the default.
    let mut request = reqwest::Client::builder().timeout(Duration::from_secs(300)).build()?.put(&url).bearer_auth(token).body(component);
    if let Some((pubsub, topic)) = placement {
        request = request.query(&[("pubsub", pubsub), ("topic", topic)]);
    }
    print_change("deployed", &admin_call(request, &url).await?);
    Ok(())
}

/// Returns a handler to its previous version.
pub async fn rollback(base_url: &str, token: &str, tenant: &str, handler: &str) -> anyhow::Result<()> {
    let url = format!("{}/admin/tenants/{tenant}/handlers/{handler}/rollback", base_url.trim_end_matches('/'));
    print_change("rolled back", &admin_call(http()?.post(&url).bearer_auth(token), &url).await?);
    Ok(())
}

/// Prints the handlers of the host at `base_url`, with versions and counts.
pub async fn print_status(base_url: &str) -> anyhow::Result<()> {
    let url = format!("{}/wasmsub/handlers", base_url.trim_end_matches('/'));
    let body = admin_call(http()?.get(&url), &url).await?;
    println!("{:<28} {:<14} {:<22} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8}", "tenant/handler", "version", "topic", "processed", "duplicate", "retried", "reran", "dead", "deferred");
    let count = |v: &serde_json::Value| v.as_u64().unwrap_or(0).to_string();
    for h in body["handlers"].as_array().into_iter().flatten() {
        let counts = &h["counts"];
        println!(
            "{:<28} {:<14} {:<22} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8}",
            format!("{}/{}", h["tenant"].as_str().unwrap_or(""), h["handler"].as_str().unwrap_or("")),
            h["version"].as_str().unwrap_or("").chars().take(12).collect::<String>(),
            h["topic"].as_str().unwrap_or(""),
            count(&counts["processed"]), count(&counts["duplicates"]), count(&counts["retries"]),
            count(&counts["reruns"]), count(&counts["dead_lettered"]), count(&counts["deferred"]),
        );
    }
    Ok(())
}
