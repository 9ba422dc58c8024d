//! Dispatch: one attempt of one event on a fresh instance of the handler's
//! current version, inside the tenant's concurrency limit.
//!
//! The version is taken when the attempt starts (after waiting for the
//! tenant's slot), so a deploy takes effect for every attempt that has not
//! started yet, retries included.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::{InFlight, Pipeline};
use crate::cloudevent::CloudEvent;
use crate::runtime::{AttemptContext, AttemptResult, Dispatched, Event, HandlerComponent};

/// A finished attempt: its result, the version that ran it, and the
/// tenant slot it held (kept by the caller through a commit).
pub(super) struct Attempt {
    pub result: AttemptResult,
    pub component: Option<Arc<HandlerComponent>>,
    pub slot: Option<OwnedSemaphorePermit>,
}

impl Pipeline {
    pub(super) async fn attempt(&self, flight: &InFlight<'_>, event: &CloudEvent, attempt: u32) -> Attempt {
        let handler = flight.handler;
        let tenant = &handler.tenant;
        tenant.waiting.fetch_add(1, Ordering::Relaxed);
        let slot = tenant.concurrency.clone().acquire_owned().await;
        tenant.waiting.fetch_sub(1, Ordering::Relaxed);
        let Ok(slot) = slot else {
            let result = AttemptResult::Infrastructure("tenant concurrency gate closed".into());
            return Attempt { result, component: None, slot: None };
        };
        let component = handler.current();
        let ctx = AttemptContext {
            tenant: tenant.name.clone(),
            namespace: tenant.namespace.clone(),
            handler: handler.name.clone(),
            version: component.short_version().into(),
            event_id: flight.event_id.as_str().into(),
            store: self.store.clone(),
            publish_topics: tenant.publish_topics.clone(),
            capabilities: tenant.capabilities.clone(),
            memory_bytes: tenant.limits.memory_mib as usize * 1024 * 1024,
            table_elements: tenant.limits.table_elements as usize,
            max_log_bytes: tenant.limits.max_log_bytes,
            fuel: tenant.limits.fuel,
            cpu_time: tenant.limits.cpu_time,
            wall_time: tenant.limits.wall_time,
            max_state_bytes: tenant.limits.max_state_bytes,
            max_state_keys: tenant.limits.max_state_keys,
            guest_log: None,
        };
        let started = std::time::Instant::now();
        // One span per attempt, a child of the delivery's.
        let span = tracing::info_span!("attempt", messaging.attempt = attempt, handler.version = %component.short_version());
        let dispatching = self.runtime.dispatch(component.clone(), ctx, to_wit_event(event, attempt)).instrument(span);
        let Dispatched { result, instantiation, made_ahead } = tokio::select! {
            dispatched = dispatching => dispatched,
            // The host's stop timed out: drop the instance here, while the
            // runtime is whole; nothing was committed, the event comes again.
            () = self.abandon.cancelled() => {
                let reason = "the host stopped before the attempt finished; the event comes again".into();
                return Attempt { result: AttemptResult::Infrastructure(reason), component: Some(component), slot: Some(slot) };
            }
        };
        let limit = match &result {
            AttemptResult::Trapped { limit, .. } => limit.map(|l| l.label()),
            _ => None,
        };
        self.metrics.attempt(&tenant.name, &handler.name, &component.label, result.label(), limit, started.elapsed());
        if let Some(instantiation) = instantiation {
            self.metrics.instantiation(&tenant.name, &handler.name, instantiation);
        }
        if made_ahead {
            self.metrics.made_ahead(&tenant.name, &handler.name);
        }
        Attempt { result, component: Some(component), slot: Some(slot) }
    }
}

/// The event as the guest sees it (the WIT `event` record).
pub fn to_wit_event(event: &CloudEvent, attempt: u32) -> Event {
    Event {
        id: event.id.clone(),
        source: event.source.clone(),
        type_: event.ty.clone(),
        specversion: event.specversion.clone(),
        subject: event.subject.clone(),
        time: event.time.clone(),
        datacontenttype: event.datacontenttype.clone(),
        data: event.data.clone(),
        extensions: event.extensions.clone(),
        topic: event.topic.clone(),
        pubsubname: event.pubsubname.clone(),
        attempt,
    }
}
