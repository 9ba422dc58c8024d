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

/// How a command prints what it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Lines for people.
    Text,
    /// One JSON document, for scripts (`jq`).
    Json,
}

/// Writes `text` to stdout. A reader that went away (`| head`) ends the
/// command quietly, as it does for other command-line tools.
pub fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error).context("writing to stdout"),
        _ => Ok(()),
    }
}

/// Writes `value` to stdout as pretty JSON (`--output json`).
pub fn emit_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    emit(&format!("{}\n", serde_json::to_string_pretty(value)?))
}

/// A CloudEvent carrying `data`: the CLI sets the id, so it can print it,
/// and a publish repeated with `--id` is the same event (a duplicate).
pub fn envelope(id: &str, event_type: &str, data: &[u8], content_type: &str) -> serde_json::Value {
    let mut event = serde_json::json!({
        "specversion": "1.0", "id": id, "source": "wasmsub-cli", "type": event_type,
        "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "datacontenttype": content_type,
    });
    let json = crate::cloudevent::is_json_media_type(content_type).then(|| serde_json::from_slice::<serde_json::Value>(data).ok()).flatten();
    match (json, std::str::from_utf8(data)) {
        (Some(value), _) => event["data"] = value,
        (None, Ok(text)) => event["data"] = serde_json::Value::String(text.to_owned()),
        (None, Err(_)) => {
            use base64::Engine;
            event["data_base64"] = base64::engine::general_purpose::STANDARD.encode(data).into();
        }
    }
    event
}

/// Publishes `event` (a CloudEvent) to `topic` through the publish API at
/// `base_url`, and prints its id.
pub async fn publish(base_url: &str, pubsub: &str, topic: &str, event: serde_json::Value, output: Output) -> anyhow::Result<()> {
    let url = format!("{}/v1.0/publish/{pubsub}/{topic}", base_url.trim_end_matches('/'));
    let response = http()?
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, crate::cloudevent::CLOUDEVENTS_JSON)
        .body(event.to_string())
        .send()
        .await
        .with_context(|| format!("publishing to {url} (is `wasmsub run` or daprd listening there?)"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        bail!("publishing to {url} was refused with {status}: {text}");
    }
    let id = event["id"].as_str().unwrap_or_default();
    match output {
        Output::Text => emit(&format!("published event {} to {pubsub}/{topic}\n", printable(id))),
        Output::Json => emit_json(&serde_json::json!({"id": id, "pubsub": pubsub, "topic": topic})),
    }
}

/// Prints the recent dead letters of the host at `base_url`.
pub async fn print_dead_letters(base_url: &str, output: Output) -> anyhow::Result<()> {
    let url = format!("{}/wasmsub/dead-letters", base_url.trim_end_matches('/'));
    let response = http()?.get(&url).send().await.with_context(|| format!("reading {url} (is `wasmsub run` listening there?)"))?;
    let status = response.status();
    if !status.is_success() {
        bail!("reading {url} failed with {status}");
    }
    let entries: Vec<DeadLetter> = response.json().await.with_context(|| format!("decoding the answer of {url}"))?;
    if output == Output::Json {
        return emit_json(&entries);
    }
    let mut text = String::new();
    if entries.is_empty() {
        text.push_str("no dead letters\n");
    }
    for entry in entries {
        text.push_str(&format!(
            "{at}  {tenant}/{handler}  event {id} on {topic} -> {dlt} after {attempts} attempt(s): {reason}\n",
            at = printable(&entry.at),
            tenant = printable(&entry.tenant),
            handler = printable(&entry.handler),
            id = printable(&entry.event_id),
            topic = printable(&entry.topic),
            dlt = printable(&entry.dead_letter_topic),
            attempts = entry.attempts,
            reason = printable(&entry.reason),
        ));
    }
    emit(&text)
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

fn print_change(verb: &str, change: &serde_json::Value) -> anyhow::Result<()> {
    let short = |v: &serde_json::Value| v.as_str().map(|s| s.chars().take(12).collect::<String>()).unwrap_or_default();
    let (from, to) = (short(&change["from"]), short(&change["to"]));
    let name = printable(&format!("{}/{}", change["tenant"].as_str().unwrap_or(""), change["handler"].as_str().unwrap_or(""))).into_owned();
    emit(&match (from.as_str(), to.as_str()) {
        ("", to) => format!("{verb} {name}: new handler, version {to}\n"),
        (from, to) if from == to => format!("{name}: version {to} is already serving; nothing changed\n"),
        (from, to) => format!("{verb} {name}: {from} -> {to}\n"),
    })
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
    print_change("deployed", &admin_call(request, &url).await?)
}

/// Returns a handler to its previous version.
pub async fn rollback(base_url: &str, token: &str, tenant: &str, handler: &str) -> anyhow::Result<()> {
    let url = format!("{}/admin/tenants/{tenant}/handlers/{handler}/rollback", base_url.trim_end_matches('/'));
    print_change("rolled back", &admin_call(http()?.post(&url).bearer_auth(token), &url).await?)
}

/// Prints the handlers of the host at `base_url`, with versions and counts.
pub async fn print_status(base_url: &str, output: Output) -> anyhow::Result<()> {
    let url = format!("{}/wasmsub/handlers", base_url.trim_end_matches('/'));
    let body = admin_call(http()?.get(&url), &url).await?;
    if output == Output::Json {
        return emit_json(&body);
    }
    let mut text = format!("{:<28} {:<14} {:<22} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8}\n", "tenant/handler", "version", "topic", "processed", "duplicate", "retried", "reran", "dead", "deferred");
    let count = |v: &serde_json::Value| v.as_u64().unwrap_or(0).to_string();
    for h in body["handlers"].as_array().into_iter().flatten() {
        let counts = &h["counts"];
        text.push_str(&format!(
            "{:<28} {:<14} {:<22} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8}\n",
            printable(&format!("{}/{}", h["tenant"].as_str().unwrap_or(""), h["handler"].as_str().unwrap_or(""))),
            h["version"].as_str().unwrap_or("").chars().take(12).collect::<String>(),
            printable(h["topic"].as_str().unwrap_or("")),
            count(&counts["processed"]), count(&counts["duplicates"]), count(&counts["retries"]),
            count(&counts["reruns"]), count(&counts["dead_lettered"]), count(&counts["deferred"]),
        ));
    }
    emit(&text)
}

/// Prints tenant `tenant`'s committed value of `key`: the bytes as they
/// are (text), or a JSON document with the value as text when it is UTF-8
/// and as base64 otherwise.
pub async fn print_state(base_url: &str, token: &str, tenant: &str, key: &str, output: Output) -> anyhow::Result<()> {
    let url = format!(
        "{}/admin/tenants/{}/state/{}",
        base_url.trim_end_matches('/'),
        crate::sidecar::path_segment(tenant),
        crate::sidecar::path_segment(key)
    );
    let response = http()?.get(&url).bearer_auth(token).send().await.with_context(|| format!("calling {url} (is `wasmsub run` listening there?)"))?;
    let status = response.status();
    let bytes = response.bytes().await.with_context(|| format!("reading the answer of {url}"))?;
    if !status.is_success() {
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let reason = body.get("error").and_then(|e| e.as_str()).unwrap_or("no reason given");
        bail!("{url} answered {status}: {}", printable(reason));
    }
    match output {
        Output::Text => {
            // The raw bytes, so `> file` keeps them; a terminal gets them escaped.
            use std::io::IsTerminal;
            if std::io::stdout().is_terminal() {
                emit(&format!("{}\n", printable(&String::from_utf8_lossy(&bytes))))
            } else {
                use std::io::Write;
                match std::io::stdout().lock().write_all(&bytes) {
                    Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error).context("writing to stdout"),
                    _ => Ok(()),
                }
            }
        }
        Output::Json => {
            let value = match std::str::from_utf8(&bytes) {
                Ok(text) => serde_json::json!({"tenant": tenant, "key": key, "value": text}),
                Err(_) => {
                    use base64::Engine;
                    serde_json::json!({"tenant": tenant, "key": key, "value_base64": base64::engine::general_purpose::STANDARD.encode(&bytes)})
                }
            };
            emit_json(&value)
        }
    }
}
