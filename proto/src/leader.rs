//! Finding the leader among several coordinators (high availability on etcd, see the coordinator's `ha`
//! module).
//!
//! Wire contract: a coordinator that is not the leader answers every `Coordinator`, `WorkerControl` and
//! `Rendezvous` call with `UNAVAILABLE` and, when it knows the leader, the metadata
//! [`LEADER_METADATA_KEY`]` = <leader URL>` (the URL the leader advertises, `--advertise-url`). Clients
//! take a list of coordinator URLs (`--coordinator http://a:7070,http://b:7070`) and keep one current
//! endpoint in an [`Endpoints`]: after a failed call they follow the hint when there is one, else move on to
//! the next URL of the list. Only the choice of URL lives here; building channels stays with the caller (so
//! TLS and tokens apply the same way whichever URL is current).

/// gRPC metadata (response headers/trailers) naming the leader's URL on a follower's `UNAVAILABLE` answer.
pub const LEADER_METADATA_KEY: &str = "x-qcluster-leader";

/// The leader URL a follower named in `status`, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    let url = status.metadata().get(LEADER_METADATA_KEY)?.to_str().ok()?.trim();
    (url.starts_with("http://") || url.starts_with("https://")).then(|| url.to_string())
}

/// Whether `status` came from a coordinator that answered "not the leader" (with or without a hint).
pub fn is_follower_answer(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.message().starts_with(NOT_LEADER_PREFIX)
}

/// How a follower's `UNAVAILABLE` message starts (see [`is_follower_answer`]).
pub const NOT_LEADER_PREFIX: &str = "not the leader";

/// Errors in a coordinator URL list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointsError {
    #[error("no coordinator URL given")]
    Empty,
    #[error("coordinator URL {0:?} must start with http:// or https://")]
    Scheme(String),
}

/// A list of coordinator URLs and the one to use now.
///
/// Invariants: the list is non-empty and every URL has an `http://` or `https://` scheme; [`Endpoints::current`]
/// is either a hinted leader URL (which need not be in the list: the leader may advertise another name) or an
/// entry of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    urls: Vec<String>,
    index: usize,
    hinted: Option<String>,
}

impl Endpoints {
    /// Parses `http://a:7070,http://b:7070` (spaces around commas allowed; a trailing `/` is dropped).
    pub fn parse(list: &str) -> Result<Endpoints, EndpointsError> {
        let urls: Vec<String> =
            list.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() {
            return Err(EndpointsError::Empty);
        }
        if let Some(bad) = urls.iter().find(|u| !(u.starts_with("http://") || u.starts_with("https://"))) {
            return Err(EndpointsError::Scheme(bad.clone()));
        }
        Ok(Endpoints { urls, index: 0, hinted: None })
    }

    /// The URL to call now.
    pub fn current(&self) -> &str {
        self.hinted.as_deref().unwrap_or(&self.urls[self.index])
    }

    /// Every URL of the list, in order.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// After a failed call on [`Endpoints::current`]: follows the leader hint in `status` when it names
    /// another URL, else moves on to the next URL of the list. Returns whether the move followed a hint
    /// (callers retry at once then, and back off otherwise).
    pub fn failed(&mut self, status: Option<&tonic::Status>) -> bool {
        if let Some(hint) = status.and_then(leader_hint)
            && hint.trim_end_matches('/') != self.current()
        {
            self.hinted = Some(hint.trim_end_matches('/').to_string());
            return true;
        }
        if self.hinted.take().is_none() {
            self.index = (self.index + 1) % self.urls.len();
        }
        false
    }

    /// Starts over from the first URL of the list (no hint).
    pub fn reset(&mut self) {
        self.index = 0;
        self.hinted = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(url: &str) -> tonic::Status {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(LEADER_METADATA_KEY, url.parse().unwrap());
        tonic::Status::with_metadata(tonic::Code::Unavailable, format!("{NOT_LEADER_PREFIX}; the leader is {url}"), md)
    }

    #[test]
    fn parses_lists_and_refuses_bad_urls() {
        let e = Endpoints::parse(" http://a:1/ , https://b:2,").unwrap();
        assert_eq!(e.urls(), ["http://a:1", "https://b:2"]);
        assert_eq!(e.current(), "http://a:1");
        assert_eq!(Endpoints::parse(" , "), Err(EndpointsError::Empty));
        assert_eq!(Endpoints::parse("http://a,b:7070"), Err(EndpointsError::Scheme("b:7070".into())));
    }

    #[test]
    fn follows_hints_and_rotates_without_one() {
        let mut e = Endpoints::parse("http://a,http://b,http://c").unwrap();
        // A follower names the leader: go there (even outside the list).
        assert!(e.failed(Some(&redirect("http://c"))));
        assert_eq!(e.current(), "http://c");
        // The hinted leader is gone: back to the list where we left it, then on round it.
        assert!(!e.failed(Some(&tonic::Status::unavailable("connection refused"))));
        assert_eq!(e.current(), "http://a");
        assert!(!e.failed(None));
        assert_eq!(e.current(), "http://b");
        // A hint naming the URL we are on (a stale lease of this same coordinator) is no hint.
        assert!(!e.failed(Some(&redirect("http://b"))));
        assert_eq!(e.current(), "http://c");
        assert!(!e.failed(None));
        assert_eq!(e.current(), "http://a");
        assert!(e.failed(Some(&redirect("http://elsewhere:7070/"))));
        assert_eq!(e.current(), "http://elsewhere:7070");
        e.reset();
        assert_eq!(e.current(), "http://a");
    }

    #[test]
    fn hints_only_count_on_unavailable_with_a_url() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(LEADER_METADATA_KEY, "http://x".parse().unwrap());
        let other = tonic::Status::with_metadata(tonic::Code::NotFound, "no job", md);
        assert_eq!(leader_hint(&other), None);
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(LEADER_METADATA_KEY, "".parse().unwrap());
        assert_eq!(leader_hint(&tonic::Status::with_metadata(tonic::Code::Unavailable, "x", md)), None);
        assert_eq!(leader_hint(&redirect("http://l:7070")).as_deref(), Some("http://l:7070"));
        assert!(is_follower_answer(&redirect("http://l:7070")));
        assert!(!is_follower_answer(&tonic::Status::unavailable("transport error")));
    }
}
