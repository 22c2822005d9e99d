//! The Responses API's memory: responses created with `store` are kept here so a later request
//! can continue them (`previous_response_id`) and `GET`/`DELETE /v1/responses/{id}` can find
//! them. Bounded three ways: a count, a byte budget and a time to live; the oldest go first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// What one stored response keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResponse {
    /// The response object as the API returned it (its `output` items included).
    pub response: Value,
    /// The request's own input items (`message`, `function_call`, …), without those of the
    /// responses it continued.
    pub input: Vec<Value>,
    /// The response this one continued, if any.
    pub previous: Option<String>,
}

impl StoredResponse {
    /// Bytes it is charged: the JSON length of what it holds.
    fn size(&self) -> usize {
        let json_len = |v: &Value| serde_json::to_string(v).map_or(0, |s| s.len());
        json_len(&self.response) + self.input.iter().map(json_len).sum::<usize>()
    }
}

/// The limits of a `ResponseStore`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most responses kept (0: none are stored).
    pub max_count: usize,
    /// Most bytes kept, counted as the JSON length of each response and its input.
    pub max_bytes: usize,
    /// How long a response is kept after it was stored.
    pub ttl: Duration,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_count: 1000,
            max_bytes: 256 << 20,
            ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why a response could not be stored.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store keeps nothing (`max_count` is 0).
    #[error("this server stores no responses (responses_max_count is 0)")]
    Disabled,
    /// One response is larger than the whole byte budget.
    #[error("the response is {size} bytes, more than the store's whole budget of {budget}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The budget.
        budget: usize,
    },
}

/// Stored responses by id, oldest first for eviction. One mutex: every operation is a few
/// map updates, never held across an await.
#[derive(Debug)]
pub struct ResponseStore {
    limits: StoreLimits,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each response with its entry.
    by_id: HashMap<String, Entry>,
    /// (serial, id) in the order they were stored; a pair whose serial is no longer its id's
    /// (deleted or stored again) is skipped when it comes up.
    order: VecDeque<(u64, String)>,
    /// Sum of the sizes in `by_id`.
    bytes: usize,
    /// The serial of the next response stored.
    next_serial: u64,
}

#[derive(Debug)]
struct Entry {
    response: StoredResponse,
    size: usize,
    expires: Instant,
    serial: u64,
}

impl ResponseStore {
    /// An empty store with these limits.
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Whether it keeps anything (`max_count` above 0).
    pub fn enabled(&self) -> bool {
        self.limits.max_count > 0
    }

    /// Stores `response` under `id` at time `now`, evicting the oldest as the limits require.
    pub fn put(&self, id: String, response: StoredResponse, now: Instant) -> Result<(), StoreError> {
        if self.limits.max_count == 0 {
            return Err(StoreError::Disabled);
        }
        let size = response.size();
        if size > self.limits.max_bytes {
            return Err(StoreError::TooLarge {
                size,
                budget: self.limits.max_bytes,
            });
        }
        let mut inner = self.lock();
        inner.remove(&id);
        inner.expire(now);
        while inner.by_id.len() >= self.limits.max_count || inner.bytes + size > self.limits.max_bytes {
            inner.pop_oldest();
        }
        let serial = inner.next_serial;
        inner.next_serial += 1;
        inner.bytes += size;
        inner.order.push_back((serial, id.clone()));
        let entry = Entry {
            response,
            size,
            expires: now + self.limits.ttl,
            serial,
        };
        inner.by_id.insert(id, entry);
        Ok(())
    }

    /// The response stored under `id`, unless it expired by `now`.
    pub fn get(&self, id: &str, now: Instant) -> Option<StoredResponse> {
        let mut inner = self.lock();
        inner.expire(now);
        inner.by_id.get(id).map(|e| e.response.clone())
    }

    /// The conversation up to and including the response stored under `id`, as items: the
    /// input and output items of each response of its chain, oldest first. Fails with the id
    /// of the first response of the chain that is not (or no longer) stored.
    pub fn conversation(&self, id: &str, now: Instant) -> Result<Vec<Value>, String> {
        let mut inner = self.lock();
        inner.expire(now);
        let mut chain = Vec::new();
        let mut next = Some(id.to_string());
        while let Some(id) = next {
            // Each response continues one stored before it, so a chain is never longer than
            // the store; the bound guards against anything else.
            if chain.len() > inner.by_id.len() {
                return Err(id);
            }
            let Some(entry) = inner.by_id.get(&id) else {
                return Err(id);
            };
            next = entry.response.previous.clone();
            chain.push(&entry.response);
        }
        let mut items = Vec::new();
        for stored in chain.into_iter().rev() {
            items.extend(stored.input.iter().cloned());
            if let Some(output) = stored.response["output"].as_array() {
                items.extend(output.iter().cloned());
            }
        }
        Ok(items)
    }

    /// Forgets the response stored under `id`; false when there was none.
    pub fn delete(&self, id: &str, now: Instant) -> bool {
        let mut inner = self.lock();
        inner.expire(now);
        inner.remove(id)
    }

    /// How many responses and bytes are held now.
    pub fn held(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.by_id.len(), inner.bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state stays consistent between statements, so a panic elsewhere leaves it usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn remove(&mut self, id: &str) -> bool {
        match self.by_id.remove(id) {
            Some(entry) => {
                self.bytes -= entry.size;
                true
            }
            None => false,
        }
    }

    /// The entry an `order` pair stands for, unless it is stale.
    fn live(&self, (serial, id): &(u64, String)) -> Option<&Entry> {
        self.by_id.get(id).filter(|e| e.serial == *serial)
    }

    /// Drops the oldest stored response (and the stale pairs before it).
    fn pop_oldest(&mut self) {
        while let Some(pair) = self.order.pop_front() {
            if self.live(&pair).is_some() {
                self.remove(&pair.1);
                return;
            }
        }
    }

    /// Drops every response whose time ran out; expiry follows storage order, as the TTL is
    /// one for all.
    fn expire(&mut self, now: Instant) {
        while let Some(pair) = self.order.front() {
            match self.live(pair) {
                Some(entry) if entry.expires > now => return,
                Some(_) => self.pop_oldest(),
                None => {
                    self.order.pop_front();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn response(text: &str) -> StoredResponse {
        StoredResponse {
            response: json!({"id": text, "output": text}),
            input: vec![json!({"role": "user", "content": text})],
            previous: None,
        }
    }

    fn limits(max_count: usize, max_bytes: usize, ttl_s: u64) -> StoreLimits {
        StoreLimits {
            max_count,
            max_bytes,
            ttl: Duration::from_secs(ttl_s),
        }
    }

    #[test]
    fn keeps_what_it_stored_until_deleted() {
        let store = ResponseStore::new(StoreLimits::default());
        let t = Instant::now();
        let a = response("a");
        store.put("a".into(), a.clone(), t).unwrap();
        assert_eq!(store.get("a", t), Some(a.clone()));
        assert_eq!(store.held(), (1, a.size()));
        assert!(store.delete("a", t));
        assert!(!store.delete("a", t));
        assert_eq!(store.get("a", t), None);
        assert_eq!(store.held(), (0, 0));
    }

    #[test]
    fn the_oldest_go_first_when_the_count_is_reached() {
        let store = ResponseStore::new(limits(2, 1 << 20, 60));
        let t = Instant::now();
        for id in ["a", "b", "c"] {
            store.put(id.into(), response(id), t).unwrap();
        }
        assert_eq!(store.get("a", t), None);
        assert!(store.get("b", t).is_some() && store.get("c", t).is_some());
        assert_eq!(store.held().0, 2);
    }

    #[test]
    fn the_byte_budget_evicts_exactly_as_much_as_needed() {
        let one = response("a").size();
        let store = ResponseStore::new(limits(100, 2 * one, 60));
        let t = Instant::now();
        store.put("a".into(), response("a"), t).unwrap();
        store.put("b".into(), response("b"), t).unwrap();
        assert_eq!(store.held(), (2, 2 * one));
        store.put("c".into(), response("c"), t).unwrap();
        assert_eq!(store.held(), (2, 2 * one));
        assert_eq!(store.get("a", t), None);
        let huge = response(&"x".repeat(3 * one));
        assert_eq!(
            store.put("h".into(), huge.clone(), t),
            Err(StoreError::TooLarge {
                size: huge.size(),
                budget: 2 * one
            })
        );
        assert_eq!(store.held(), (2, 2 * one));
    }

    #[test]
    fn responses_expire_after_their_ttl() {
        let store = ResponseStore::new(limits(100, 1 << 20, 10));
        let t = Instant::now();
        store.put("a".into(), response("a"), t).unwrap();
        store
            .put("b".into(), response("b"), t + Duration::from_secs(5))
            .unwrap();
        assert!(store.get("a", t + Duration::from_secs(9)).is_some());
        assert_eq!(store.get("a", t + Duration::from_secs(10)), None);
        assert!(store.get("b", t + Duration::from_secs(10)).is_some());
        assert_eq!(store.held().0, 1);
        assert_eq!(store.get("b", t + Duration::from_secs(15)), None);
        assert_eq!(store.held(), (0, 0));
    }

    #[test]
    fn storing_an_id_again_replaces_it_and_deleted_ids_do_not_count() {
        let store = ResponseStore::new(limits(2, 1 << 20, 60));
        let t = Instant::now();
        store.put("a".into(), response("a"), t).unwrap();
        store.put("b".into(), response("b"), t).unwrap();
        store.put("a".into(), response("a2"), t).unwrap();
        // "a" is now the newest: a third response evicts "b", not it.
        store.put("c".into(), response("c"), t).unwrap();
        assert_eq!(store.get("a", t), Some(response("a2")));
        assert_eq!(store.get("b", t), None);
        assert!(store.delete("a", t));
        assert!(store.delete("c", t));
        store.put("b".into(), response("b"), t).unwrap();
        store.put("c".into(), response("c"), t).unwrap();
        assert!(store.get("b", t).is_some() && store.get("c", t).is_some());
    }

    #[test]
    fn a_conversation_gathers_its_chain_oldest_first() {
        let store = ResponseStore::new(StoreLimits::default());
        let t = Instant::now();
        let turn = |n: u32, previous: Option<&str>| StoredResponse {
            response: json!({"id": format!("r{n}"), "output": [format!("out{n}")]}),
            input: vec![json!(format!("in{n}"))],
            previous: previous.map(str::to_string),
        };
        store.put("r1".into(), turn(1, None), t).unwrap();
        store.put("r2".into(), turn(2, Some("r1")), t).unwrap();
        store.put("r3".into(), turn(3, Some("r2")), t).unwrap();
        assert_eq!(
            store.conversation("r3", t).unwrap(),
            [
                json!("in1"),
                json!("out1"),
                json!("in2"),
                json!("out2"),
                json!("in3"),
                json!("out3")
            ]
        );
        assert_eq!(store.conversation("r9", t), Err("r9".to_string()));
        store.delete("r1", t);
        assert_eq!(store.conversation("r3", t), Err("r1".to_string()));
    }

    #[test]
    fn a_store_of_no_responses_says_so() {
        let store = ResponseStore::new(limits(0, 1 << 20, 60));
        assert_eq!(
            store.put("a".into(), response("a"), Instant::now()),
            Err(StoreError::Disabled)
        );
    }
}
