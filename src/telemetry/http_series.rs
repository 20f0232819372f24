//! The HTTP series' handles by label set: a request costs a hash lookup
//! instead of building label strings and a registry key.

use std::collections::HashMap;

use metrics::{Counter, Histogram};

/// Handles of one (method, route, status) series.
#[derive(Debug, Clone)]
pub(super) struct HttpHandles {
    pub(super) requests: Counter,
    pub(super) duration: Histogram,
}

/// One cached label set.
type HttpEntry = (Box<str>, Box<str>, u16, HttpHandles);

/// HTTP handles by label set, so that a request costs a hash lookup instead
/// of building label strings and a registry key. Label sets are bounded by
/// the routes, methods and statuses the router produces.
#[derive(Debug, Default)]
pub(super) struct HttpCache {
    entries: parking_lot::RwLock<HashMap<u64, Vec<HttpEntry>>>,
}

impl HttpCache {
    fn hash(method: &str, route: &str, status: u16) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        (method, route, status).hash(&mut hasher);
        hasher.finish()
    }

    pub(super) fn get(&self, method: &str, route: &str, status: u16) -> Option<HttpHandles> {
        let entries = self.entries.read();
        entries
            .get(&Self::hash(method, route, status))?
            .iter()
            .find(|(m, r, s, _)| &**m == method && &**r == route && *s == status)
            .map(|(.., handles)| handles.clone())
    }

    pub(super) fn insert(&self, method: &str, route: &str, status: u16, handles: HttpHandles) {
        let mut entries = self.entries.write();
        let bucket = entries
            .entry(Self::hash(method, route, status))
            .or_default();
        if !bucket
            .iter()
            .any(|(m, r, s, _)| &**m == method && &**r == route && *s == status)
        {
            bucket.push((method.into(), route.into(), status, handles));
        }
    }
}
