//! Where the stores keep things: the one key layout, imported by the stores
//! and by tests that look into a store from outside (through Dapr's state
//! API, say) instead of retyping the format.
//!
//! Every composite key is length-prefixed part by part, so no choice of
//! tenant, handler, event id or state key can make two keys collide
//! (`a|b` + `c` vs `a` + `b|c`).

/// Where the idempotency store keeps one handler's record of one event.
/// Each handler sees each event once: two handlers on one topic do not
/// dedupe each other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DedupeKey {
    /// The tenant that owns the handler.
    pub tenant: String,
    /// The handler, within its tenant.
    pub handler: String,
    /// The event's id, as the handler's id mode derives it.
    pub event_id: String,
}

impl DedupeKey {
    /// The key as one string: each part length-prefixed.
    pub fn encoded(&self) -> String {
        let mut out = String::with_capacity(self.tenant.len() + self.handler.len() + self.event_id.len() + 24);
        for part in [&self.tenant, &self.handler, &self.event_id] {
            out.push_str(&part.len().to_string());
            out.push(':');
            out.push_str(part);
        }
        out
    }
}

impl std::fmt::Display for DedupeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.handler, self.event_id)
    }
}

/// The Dapr state key of an event's claim or done record
/// (`encoded` is [`DedupeKey::encoded`]).
pub fn dapr_claim_key(encoded: &str) -> String {
    format!("wasmsub|claim|{encoded}")
}

/// The Dapr state key of a tenant's state entry: the tenant's name is
/// length-prefixed, so no key string reaches another tenant's entries.
pub fn dapr_record_key(key: &str) -> String {
    format!("wasmsub|record|{key}")
}

/// The Dapr state key of a tenant's state `key`.
pub fn dapr_state_key(tenant: &str, key: &str) -> String {
    format!("wasmsub|state|{}:{tenant}|{key}", tenant.len())
}

/// The Dapr state key of the commit lock on a tenant's state key (stores
/// without atomic multi-key transactions serialise commits per key with it).
pub fn dapr_lock_key(tenant: &str, key: &str) -> String {
    format!("wasmsub|lock|{}:{tenant}|{key}", tenant.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str, h: &str, e: &str) -> DedupeKey {
        DedupeKey { tenant: t.into(), handler: h.into(), event_id: e.into() }
    }

    #[test]
    fn encoded_keys_cannot_collide_across_parts() {
        assert_ne!(key("a:b", "c", "d").encoded(), key("a", "b:c", "d").encoded());
        assert_ne!(key("ab", "", "c").encoded(), key("a", "b", "c").encoded());
        assert_eq!(key("t", "h", "e").encoded(), "1:t1:h1:e");
    }

    #[test]
    fn tenant_state_keys_cannot_collide() {
        assert_ne!(dapr_state_key("a", "b|c"), dapr_state_key("a|b", "c"));
        assert_eq!(dapr_state_key("todo", "task:1"), "wasmsub|state|4:todo|task:1");
        assert_eq!(dapr_claim_key(&key("acme", "slow", "slow-1").encoded()), "wasmsub|claim|4:acme4:slow6:slow-1");
    }
}
