//! Traces. Two things live here:
//!
//! - the OTLP exporter: spans go to an OpenTelemetry collector when the
//!   standard `OTEL_*` variables ask for it (off otherwise: no span is
//!   built for export and nothing is sent);
//! - [`TraceContext`]: the W3C `traceparent`/`tracestate` an event carries.
//!   A delivery's span continues it, and every event its handler publishes
//!   (and its dead letter) carries the delivery's context on, so a trace
//!   crosses from one handler to the next. With export off, the context an
//!   event arrived with is passed on unchanged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Map, Value};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The tracer provider: flush it (`shutdown`) before the process ends.
pub type TracerProvider = SdkTracerProvider;

/// Set once the exporter's layer is installed: only then do spans have
/// OpenTelemetry contexts worth reading.
static EXPORTING: AtomicBool = AtomicBool::new(false);

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// Whether the environment asks for traces, by the OpenTelemetry
/// conventions: an OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER=otlp`
/// turns them on; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
/// keeps them off. `var` reads a variable (the process environment, or a
/// test's map).
pub fn traces_requested(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|value| !value.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|value| value.trim().eq_ignore_ascii_case("true")) {
        return false;
    }
    match var("OTEL_TRACES_EXPORTER").map(|value| value.trim().to_ascii_lowercase()) {
        Some(exporter) if exporter == "none" => false,
        Some(exporter) if exporter == "otlp" => true,
        _ => set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    }
}

/// The tracer provider exporting over OTLP, configured by the `OTEL_*`
/// variables (endpoint, `http/protobuf` or `http/json` protocol, headers,
/// timeout, sampler, resource attributes); the service name defaults to
/// `wasmsub`. Spans are batched and sent from a thread of the SDK's own,
/// never from the event path.
pub fn otlp_provider() -> anyhow::Result<SdkTracerProvider> {
    if let Ok(exporter) = std::env::var("OTEL_TRACES_EXPORTER")
        && !matches!(exporter.trim(), "otlp" | "none" | "")
    {
        anyhow::bail!("OTEL_TRACES_EXPORTER={exporter} is not supported: wasmsub exports traces over OTLP only (`otlp`, or `none`)");
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .build()
        .context("configuring the OTLP trace exporter from the OTEL_EXPORTER_OTLP_* variables (protocols: http/protobuf, http/json)")?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("wasmsub");
    }
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// The `tracing` layer that turns spans into OpenTelemetry spans of
/// `provider`. Installing it switches trace contexts on for
/// [`TraceContext`].
pub fn layer<S>(provider: &SdkTracerProvider) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    EXPORTING.store(true, Ordering::Relaxed);
    tracing_opentelemetry::layer().with_tracer(provider.tracer("wasmsub"))
}

/// Names `span` (declared with empty `otel.name` and `otel.kind` fields)
/// as OpenTelemetry's messaging conventions name a delivery: "process
/// {topic}", kind consumer. Only when spans are exported: the log lines in
/// the span need not carry it.
pub fn name_consumer_span(span: &tracing::Span, topic: &str) {
    if EXPORTING.load(Ordering::Relaxed) {
        span.record("otel.name", format!("process {topic}"));
        span.record("otel.kind", "consumer");
    }
}

/// The W3C trace context of one event (its `traceparent` and `tracestate`
/// attributes), as text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent`: version, trace id, parent span id, flags.
    pub traceparent: Option<String>,
    /// `tracestate`: vendors' entries, passed on as they came.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context among an event's extension attributes. Dapr also writes
    /// the traceparent as `traceid`; that is the fallback.
    pub fn of_extensions(extensions: &[(String, String)]) -> Self {
        let find = |name: &str| extensions.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone());
        Self { traceparent: find(TRACEPARENT).or_else(|| find("traceid")), tracestate: find(TRACESTATE) }
    }

    /// Makes `span` (not yet entered) a child of this context, when spans
    /// are exported and the context is valid; otherwise `span` starts (or
    /// stays out of) a trace of its own.
    pub fn continue_in(&self, span: &tracing::Span) {
        if !EXPORTING.load(Ordering::Relaxed) || self.traceparent.is_none() {
            return;
        }
        let parent = TraceContextPropagator::new().extract(&self.carrier());
        if parent.span().span_context().is_valid() {
            // Fails only for a span already started or filtered out: it
            // then keeps its own trace.
            let _ = span.set_parent(parent);
        }
    }

    /// The context to hand on for work done inside `span`: the span's own
    /// when spans are exported, else this one unchanged.
    pub fn handed_on_from(&self, span: &tracing::Span) -> Self {
        if !EXPORTING.load(Ordering::Relaxed) {
            return self.clone();
        }
        let context = span.context();
        if !context.span().span_context().is_valid() {
            return self.clone();
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&context, &mut carrier);
        Self { traceparent: carrier.remove(TRACEPARENT), tracestate: carrier.remove(TRACESTATE).filter(|state| !state.is_empty()) }
    }

    /// Writes this context into a CloudEvent's attributes, replacing what
    /// the event had (Dapr's `traceid` included: it names the old delivery).
    pub fn write_into(&self, event: &mut Map<String, Value>) {
        for field in [TRACEPARENT, TRACESTATE, "traceid"] {
            event.remove(field);
        }
        if let Some(traceparent) = &self.traceparent {
            event.insert(TRACEPARENT.into(), traceparent.clone().into());
        }
        if let Some(tracestate) = &self.tracestate {
            event.insert(TRACESTATE.into(), tracestate.clone().into());
        }
    }

    /// The context a CloudEvent's attributes carry (for a publish to the
    /// sidecar, which takes it as HTTP headers).
    pub fn of_event(event: &Map<String, Value>) -> Self {
        let text = |name: &str| event.get(name).and_then(Value::as_str).map(str::to_owned);
        Self { traceparent: text(TRACEPARENT), tracestate: text(TRACESTATE) }
    }

    fn carrier(&self) -> HashMap<String, String> {
        let mut carrier = HashMap::new();
        if let Some(traceparent) = &self.traceparent {
            carrier.insert(TRACEPARENT.to_owned(), traceparent.clone());
        }
        if let Some(tracestate) = &self.tracestate {
            carrier.insert(TRACESTATE.to_owned(), tracestate.clone());
        }
        carrier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn traces_are_off_unless_the_environment_asks() {
        assert!(!traces_requested(env(&[])));
        assert!(traces_requested(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")])));
        assert!(traces_requested(env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/v1/traces")])));
        assert!(traces_requested(env(&[("OTEL_TRACES_EXPORTER", "otlp")])));
        assert!(!traces_requested(env(&[("OTEL_TRACES_EXPORTER", "none"), ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")])));
        assert!(!traces_requested(env(&[("OTEL_SDK_DISABLED", "true"), ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")])));
        assert!(!traces_requested(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
    }

    #[test]
    fn without_export_the_arriving_context_is_handed_on_unchanged() {
        let extensions = vec![("traceid".to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string())];
        let context = TraceContext::of_extensions(&extensions);
        assert_eq!(context.traceparent.as_deref(), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let handed_on = context.handed_on_from(&tracing::Span::none());
        assert_eq!(handed_on, context);

        let mut event = Map::new();
        event.insert("traceid".into(), "stale".into());
        event.insert("tracestate".into(), "stale=1".into());
        handed_on.write_into(&mut event);
        assert_eq!(event.get("traceparent").and_then(Value::as_str), context.traceparent.as_deref());
        assert!(event.get("traceid").is_none() && event.get("tracestate").is_none());
        assert_eq!(TraceContext::of_event(&event), context);
    }
}
