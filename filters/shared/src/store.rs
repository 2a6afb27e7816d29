//! Envoy shared data as the cores see it: a key-value map shared by every
//! worker's VM (same `vm_id`), with compare-and-swap versions.
//!
//! Envoy's semantics, which [`MemoryStore`] copies so core tests see the same:
//! a `set` with a version succeeds only if the entry still has that version;
//! a `set` without one, or of a missing key, is unconditional; entries are
//! never deleted (proxy-wasm has no delete). So: create keys once, before
//! traffic ([`ensure`]), and change them only through [`update`].

use std::collections::HashMap;
use std::sync::Mutex;

/// The version check failed: someone else wrote the entry since it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict;

pub trait SharedStore {
    /// The value and its version, or `None` if the key was never written.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value` if the entry still has version `cas` (or unconditionally with `None`).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Conflict>;
}

/// Creates `key` with `initial` unless it exists. Call at configure time: the
/// first configure (Envoy's main thread) runs before any worker takes traffic,
/// so no update can be lost to this unconditional write.
pub fn ensure(store: &dyn SharedStore, key: &str, initial: &[u8]) {
    if store.get(key).is_none() {
        let _ = store.set(key, initial, None);
    }
}

/// What an [`update`] step decided.
pub enum Step<T> {
    /// Write these bytes (if the version still matches), then return `T`.
    Write(Vec<u8>, T),
    /// Nothing to write: return `T` as decided from the value read.
    Keep(T),
}

/// The update could not be applied within the attempt budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted;

/// Read-modify-write with CAS, retried on conflict.
///
/// `decide` sees the current bytes (`None` if missing) and must be a pure
/// function of them: it may run several times. Returns its result and the
/// number of conflicts seen. A missing key is created with the decided bytes;
/// [`ensure`] at configure time keeps that path cold.
pub fn update<T>(
    store: &dyn SharedStore,
    key: &str,
    max_attempts: u32,
    mut decide: impl FnMut(Option<&[u8]>) -> Step<T>,
) -> Result<(T, u32), Exhausted> {
    let mut conflicts = 0;
    for _ in 0..max_attempts {
        let current = store.get(key);
        let (bytes, cas) = match &current {
            Some((b, cas)) => (Some(b.as_slice()), Some(*cas)),
            None => (None, None),
        };
        match decide(bytes) {
            Step::Keep(result) => return Ok((result, conflicts)),
            Step::Write(new, result) => match store.set(key, &new, cas) {
                Ok(()) => return Ok((result, conflicts)),
                Err(Conflict) => conflicts += 1,
            },
        }
    }
    Err(Exhausted)
}

/// An in-process store with Envoy's semantics, for tests (thread-safe, so
/// tests can hammer it from several threads as Envoy's workers do).
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Entries>,
}

/// Every entry with its version, and the last version handed out.
type Entries = (HashMap<String, (Vec<u8>, u32)>, u32);

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys ever written.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.0.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of every key and value.
    pub fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        self.inner
            .lock()
            .map(|g| {
                g.0.iter()
                    .map(|(k, (v, _))| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.inner.lock().ok()?.0.get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Conflict> {
        let Ok(mut guard) = self.inner.lock() else {
            return Err(Conflict);
        };
        let (map, counter) = &mut *guard;
        *counter = counter.wrapping_add(1).max(1);
        let version = *counter;
        match map.get_mut(key) {
            Some(entry) => {
                if cas.is_some_and(|c| c != entry.1) {
                    return Err(Conflict);
                }
                *entry = (value.to_vec(), version);
            }
            None => {
                map.insert(key.to_string(), (value.to_vec(), version));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn cas_refuses_stale_versions() {
        let s = MemoryStore::new();
        ensure(&s, "k", b"a");
        let (_, v1) = s.get("k").unwrap();
        s.set("k", b"b", Some(v1)).unwrap();
        assert_eq!(s.set("k", b"c", Some(v1)), Err(Conflict));
        assert_eq!(s.get("k").unwrap().0, b"b");
        ensure(&s, "k", b"z");
        assert_eq!(s.get("k").unwrap().0, b"b", "ensure must not overwrite");
    }

    #[test]
    fn concurrent_increments_are_exact() {
        let s = Arc::new(MemoryStore::new());
        ensure(&*s, "n", &0u64.to_le_bytes());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        update(&*s, "n", 1000, |cur| {
                            let n = u64::from_le_bytes(cur.unwrap().try_into().unwrap());
                            Step::Write((n + 1).to_le_bytes().to_vec(), ())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = u64::from_le_bytes(s.get("n").unwrap().0.try_into().unwrap());
        assert_eq!(n, 4000);
    }
}
