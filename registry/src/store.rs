//! The quarantine store: applies key changes, keeps the last good value of a key whose new value
//! is invalid, and builds snapshots. Pure data in, decisions out; backends feed it.

use std::collections::BTreeMap;

use crate::key::{mesh_prefix, Key};
use crate::model::Object;
use crate::snapshot::{Origin, Snapshot};

/// The outcome of applying one change.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// The snapshot content changed (an object or a rejection).
    pub changed: bool,
    /// The key was newly quarantined (or for a new reason): `(full key, reason)`, to log once.
    pub rejected: Option<(String, String)>,
}

/// Every good object by key, and the keys in quarantine.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    prefix: String,
    good: BTreeMap<Key, Object>,
    rejected: BTreeMap<String, String>,
    /// The last revision applied.
    pub revision: i64,
}

impl Store {
    pub fn new(mesh: &str) -> Self {
        Store {
            prefix: mesh_prefix(mesh),
            good: BTreeMap::new(),
            rejected: BTreeMap::new(),
            revision: 0,
        }
    }

    /// The full key of a relative key.
    pub fn full(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    /// Applies a put of `bytes` at relative key `rel`; `origin` names it in errors.
    pub fn put(&mut self, rel: &str, origin: &str, bytes: &[u8]) -> Applied {
        let full = self.full(rel);
        let Some(key) = Key::parse(rel) else {
            return self.reject(full, format!("{origin}: not a registry key (expected services/NAME, routes/NAME, policies/NAME, endpoints/SERVICE/ID, meshconfig or status/ID)"));
        };
        if matches!(key, Key::Status(_)) {
            return Applied::default();
        }
        match Object::from_stored(&key, origin, bytes) {
            Ok(obj) => {
                let cleared = self.rejected.remove(&full).is_some();
                // Serialized only when there is an old value to compare: a relist of 10,000
                // new keys would otherwise serialize each of them for nothing.
                let same = (self.good.get(&key)).is_some_and(|old| old.to_json() == obj.to_json());
                self.good.insert(key, obj);
                Applied {
                    changed: cleared || !same,
                    rejected: None,
                }
            }
            Err(e) => self.reject(full, e.to_string()),
        }
    }

    fn reject(&mut self, full: String, reason: String) -> Applied {
        if self.rejected.get(&full) == Some(&reason) {
            return Applied::default();
        }
        self.rejected.insert(full.clone(), reason.clone());
        Applied {
            changed: true,
            rejected: Some((full, reason)),
        }
    }

    /// Applies a delete of relative key `rel`.
    pub fn delete(&mut self, rel: &str) -> Applied {
        let cleared = self.rejected.remove(&self.full(rel)).is_some();
        let removed = Key::parse(rel).is_some_and(|k| self.good.remove(&k).is_some());
        Applied {
            changed: cleared || removed,
            rejected: None,
        }
    }

    /// Replaces the whole content with a fresh listing at `revision`. A key whose listed value is
    /// invalid keeps its last good value; keys absent from the listing are gone.
    pub fn relist(
        &mut self,
        entries: impl IntoIterator<Item = (String, String, Vec<u8>)>,
        revision: i64,
    ) -> Vec<(String, String)> {
        let old = std::mem::take(&mut self.good);
        let old_rejected = std::mem::take(&mut self.rejected);
        let mut newly = Vec::new();
        for (rel, origin, bytes) in entries {
            let applied = self.put(&rel, &origin, &bytes);
            let full = self.full(&rel);
            if let Some(reason) = self.rejected.get(&full) {
                if let Some(k) = Key::parse(&rel) {
                    if let Some(prev) = old.get(&k) {
                        self.good.insert(k, prev.clone());
                    }
                }
                if old_rejected.get(&full) != Some(reason) {
                    newly.extend(applied.rejected);
                }
            }
        }
        self.revision = revision;
        newly
    }

    /// Restores quarantine records (from a persisted snapshot).
    pub fn set_rejected(&mut self, rejected: BTreeMap<String, String>) {
        self.rejected = rejected;
    }

    /// Inserts a known-good object (from a persisted snapshot).
    pub fn insert(&mut self, obj: Object) {
        self.good.insert(obj.key(), obj);
    }

    /// Builds the snapshot of the current content.
    pub fn snapshot(&self, origin: Origin) -> Snapshot {
        let mut s = Snapshot::of_objects(origin, self.good.values().cloned());
        s.revision = self.revision;
        s.rejected = self.rejected.clone();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"service":"ratings","rules":[{"action":"deny"}]}"#;
    const GOOD2: &str = r#"{"service":"ratings","rules":[{"action":"allow"}]}"#;

    #[test]
    fn bad_value_keeps_last_good() {
        let mut st = Store::new("m");
        assert!(st.put("policies/ratings", "k", GOOD.as_bytes()).changed);
        let a = st.put("policies/ratings", "k", b"{not json");
        assert!(a.changed);
        let (key, reason) = a.rejected.unwrap();
        assert_eq!(key, "/halyard/m/policies/ratings");
        assert!(reason.contains("not valid JSON"), "{reason}");
        let snap = st.snapshot(Origin::Live);
        assert_eq!(
            snap.policies["ratings"].rules[0].action,
            crate::model::Action::Deny
        );
        assert!(snap.rejected.contains_key("/halyard/m/policies/ratings"));
        // The same bad value again is not a new rejection.
        assert_eq!(
            st.put("policies/ratings", "k", b"{not json"),
            Applied::default()
        );
        // A good value clears the quarantine.
        assert!(st.put("policies/ratings", "k", GOOD2.as_bytes()).changed);
        assert!(st.snapshot(Origin::Live).rejected.is_empty());
    }

    /// A store holding policies for `ratings` and `other`, relisted at revision 7 with only a
    /// bad value for `ratings`: the store and the keys newly rejected.
    fn relisted_with_one_bad_key() -> (Store, usize) {
        let mut st = Store::new("m");
        st.put("policies/ratings", "k", GOOD.as_bytes());
        st.put("policies/other", "k", br#"{"service":"other","rules":[]}"#);
        let newly = st.relist(
            vec![("policies/ratings".into(), "k".into(), b"[]".to_vec())],
            7,
        );
        (st, newly.len())
    }

    #[test]
    fn relist_keeps_the_last_good_value_of_a_bad_key() {
        let (st, newly) = relisted_with_one_bad_key();
        assert_eq!(newly, 1);
        let snap = st.snapshot(Origin::Live);
        assert_eq!(snap.revision, 7);
        assert!(snap.policies.contains_key("ratings"));
    }

    #[test]
    fn relist_drops_keys_that_are_absent() {
        let (st, _) = relisted_with_one_bad_key();
        let snap = st.snapshot(Origin::Live);
        assert_eq!(snap.revision, 7);
        assert!(!snap.policies.contains_key("other"));
    }

    #[test]
    fn status_keys_are_ignored() {
        let mut st = Store::new("m");
        assert_eq!(st.put("status/x", "k", b"garbage"), Applied::default());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let mut st = Store::new("m");
        assert!(st.put("bogus/x", "k", b"{}").rejected.is_some());
    }
}
