//! Effects: what a guest asked for during one attempt, held back until the
//! attempt's outcome is known.
//!
//! State writes and publishes are buffered here; reads see the attempt's own
//! writes first. The pipeline hands the buffer to the store only when the
//! attempt succeeds, in the same commit that marks the event processed, so a
//! retried, trapped or dropped attempt leaves nothing behind.

use std::collections::BTreeMap;

/// Longest state key a guest may use. Keys are namespaced by the host, not
/// parsed, so the only reason for a bound is the store's own key size.
pub const MAX_STATE_KEY_BYTES: usize = 512;
/// Largest single state value.
pub const MAX_STATE_VALUE_BYTES: usize = 1024 * 1024;
/// Distinct state keys one attempt may write or delete.
pub const MAX_STATE_WRITES_PER_ATTEMPT: usize = 256;
/// Publishes one attempt may queue.
pub const MAX_PUBLISHES_PER_ATTEMPT: usize = 64;
/// Largest single published payload.
pub const MAX_PUBLISH_BYTES: usize = 1024 * 1024;
/// All buffered bytes of one attempt together: the host holds them in memory
/// until the attempt ends, so a guest must not be able to make them huge.
pub const MAX_BUFFERED_BYTES_PER_ATTEMPT: usize = 8 * 1024 * 1024;

/// A state write to apply: `Some` to set, `None` to delete.
pub type StateWrite = (String, Option<Vec<u8>>);

/// A publish the guest queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPublish {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub data: Vec<u8>,
    /// The payload's media type.
    pub content_type: String,
}

/// One attempt's buffered effects.
#[derive(Debug, Default)]
pub struct Effects {
    /// Last write per key wins; ordered so commits are deterministic.
    state: BTreeMap<String, Option<Vec<u8>>>,
    publishes: Vec<PendingPublish>,
    buffered_bytes: usize,
    /// Keys read from the store, with the version seen at the first read:
    /// the commit fails if any has changed since (read validation).
    reads: BTreeMap<String, Option<String>>,
}

/// An attempt's effects, taken apart for the commit.
pub struct EffectParts {
    /// State writes, in key order.
    pub writes: Vec<StateWrite>,
    /// Publishes, in order.
    pub publishes: Vec<PendingPublish>,
    /// Keys read from the store and the versions seen.
    pub reads: Vec<crate::store::ReadVersion>,
}

impl Effects {
    /// The attempt's own write of `key`, if it made one: `Some(None)` means
    /// the attempt deleted it.
    pub fn buffered_read(&self, key: &str) -> Option<Option<&[u8]>> {
        self.state.get(key).map(|value| value.as_deref())
    }

    /// Buffers a write of `key`.
    pub fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        check_key(&key)?;
        if value.len() > MAX_STATE_VALUE_BYTES {
            return Err(format!("state value of {} bytes is over the {MAX_STATE_VALUE_BYTES}-byte limit", value.len()));
        }
        self.write(key, Some(value))
    }

    /// Buffers a delete of `key`.
    pub fn delete(&mut self, key: String) -> Result<(), String> {
        check_key(&key)?;
        self.write(key, None)
    }

    fn write(&mut self, key: String, value: Option<Vec<u8>>) -> Result<(), String> {
        if !self.state.contains_key(&key) && self.state.len() >= MAX_STATE_WRITES_PER_ATTEMPT {
            return Err(format!("more than {MAX_STATE_WRITES_PER_ATTEMPT} state keys written in one attempt"));
        }
        self.charge(key.len() + value.as_ref().map_or(0, Vec::len))?;
        self.state.insert(key, value);
        Ok(())
    }

    /// Buffers a publish.
    pub fn publish(&mut self, publish: PendingPublish) -> Result<(), String> {
        if self.publishes.len() >= MAX_PUBLISHES_PER_ATTEMPT {
            return Err(format!("more than {MAX_PUBLISHES_PER_ATTEMPT} publishes in one attempt"));
        }
        if publish.data.len() > MAX_PUBLISH_BYTES {
            return Err(format!("published payload of {} bytes is over the {MAX_PUBLISH_BYTES}-byte limit", publish.data.len()));
        }
        self.charge(publish.data.len() + publish.topic.len() + publish.content_type.len())?;
        self.publishes.push(publish);
        Ok(())
    }

    fn charge(&mut self, bytes: usize) -> Result<(), String> {
        let total = self.buffered_bytes.saturating_add(bytes);
        if total > MAX_BUFFERED_BYTES_PER_ATTEMPT {
            return Err(format!("attempt's buffered effects would exceed {MAX_BUFFERED_BYTES_PER_ATTEMPT} bytes"));
        }
        self.buffered_bytes = total;
        Ok(())
    }

    /// Whether the attempt asked for nothing.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty() && self.publishes.is_empty()
    }

    /// The buffered writes and publishes, for the commit.
    pub fn into_parts(self) -> EffectParts {
        EffectParts { writes: self.state.into_iter().collect(), publishes: self.publishes, reads: self.reads.into_iter().collect() }
    }

    /// Records that the attempt read `key` from the store at `version`
    /// (the first read counts: later ones see the same snapshot or a newer
    /// one, and the first is what the guest acted on).
    pub fn record_read(&mut self, key: &str, version: Option<String>) {
        self.reads.entry(key.to_owned()).or_insert(version);
    }
}

/// A key the guest passes is data, never a path: the host stores it next to
/// the tenant's name in a structured key. Only sizes and control characters
/// (which make logs and some stores misbehave) are refused.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("state key is empty".into());
    }
    if key.len() > MAX_STATE_KEY_BYTES {
        return Err(format!("state key of {} bytes is over the {MAX_STATE_KEY_BYTES}-byte limit", key.len()));
    }
    if key.chars().any(char::is_control) {
        return Err("state key contains a control character".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_see_the_attempts_own_writes() {
        let mut effects = Effects::default();
        assert_eq!(effects.buffered_read("k"), None);
        effects.set("k".into(), b"v1".to_vec()).unwrap();
        effects.set("k".into(), b"v2".to_vec()).unwrap();
        assert_eq!(effects.buffered_read("k"), Some(Some(&b"v2"[..])));
        effects.delete("k".into()).unwrap();
        assert_eq!(effects.buffered_read("k"), Some(None));
        let parts = effects.into_parts();
        assert_eq!(parts.writes, vec![("k".to_string(), None)]);
        assert!(parts.publishes.is_empty() && parts.reads.is_empty());
    }

    #[test]
    fn limits_refuse_with_a_reason() {
        let mut effects = Effects::default();
        assert!(effects.set(String::new(), vec![]).unwrap_err().contains("empty"));
        assert!(effects.set("a\0b".into(), vec![]).unwrap_err().contains("control"));
        assert!(effects.set("k".repeat(MAX_STATE_KEY_BYTES + 1), vec![]).unwrap_err().contains("key of"));
        assert!(effects.set("k".into(), vec![0; MAX_STATE_VALUE_BYTES + 1]).unwrap_err().contains("value of"));
        for i in 0..MAX_STATE_WRITES_PER_ATTEMPT {
            effects.set(format!("k{i}"), vec![]).unwrap();
        }
        assert!(effects.set("one-more".into(), vec![]).unwrap_err().contains("state keys"));
        // Rewriting a key already written is not a new key.
        effects.set("k0".into(), b"again".to_vec()).unwrap();
    }

    #[test]
    fn buffered_bytes_are_capped_in_total() {
        let mut effects = Effects::default();
        let big = vec![0u8; MAX_STATE_VALUE_BYTES];
        let fits = MAX_BUFFERED_BYTES_PER_ATTEMPT / (MAX_STATE_VALUE_BYTES + 8);
        for i in 0..fits {
            effects.set(format!("big{i}"), big.clone()).unwrap();
        }
        assert!(effects.set("overflow".into(), big).unwrap_err().contains("exceed"));
    }
}
