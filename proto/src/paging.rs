//! Reading an etcd prefix in pages, all at one revision (DESIGN.md, decision 1).
//!
//! One response for a whole prefix does not scale: 100,000 sites are ~16 MB, and gRPC
//! clients refuse messages over 4 MiB. [`Pages`] asks for [`PAGE_KEYS`] keys at a time,
//! continuing after the last key it got, and pins every page after the first to the first
//! page's revision, so the pages together are one consistent view. The message limit only
//! has to fit one record, never the prefix: a page that is still too large (big records) is
//! asked for again with half the keys.

use etcd_client::{Client, GetOptions, KeyValue, KvClient};

/// The largest gRPC message accepted from etcd. etcd refuses a write over its
/// `--max-request-bytes` (1.5 MiB by default), so no single record is larger; 4 MiB leaves
/// room for a record of that size plus the response's framing.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Keys asked for per page: ~170 KB of typical site records, far below the limit.
pub const PAGE_KEYS: i64 = 1000;

/// gRPC's status for a message over the limit (tonic reports it as "out of range").
const OUT_OF_RANGE: i32 = 11;

/// One page: the revision every page of the listing is read at, and its records.
pub struct Page {
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
}

/// A paged read of one prefix. Call [`Pages::next`] until it returns `None`.
pub struct Pages {
    kv: KvClient,
    /// The first key of the next page.
    next_key: Vec<u8>,
    /// The end of the prefix's range (exclusive).
    end: Vec<u8>,
    /// Pinned by the first page.
    revision: Option<i64>,
    limit: i64,
    done: bool,
}

impl Pages {
    /// Page through every key under `prefix`, at the revision of the first page.
    pub fn new(client: &Client, prefix: &str) -> Self {
        Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            next_key: prefix.as_bytes().to_vec(),
            end: prefix_end(prefix.as_bytes()),
            revision: None,
            limit: PAGE_KEYS,
            done: false,
        }
    }

    /// Read at `revision` instead of the first page's (to read a second prefix at the same
    /// revision as a first).
    pub fn at_revision(mut self, revision: i64) -> Self {
        self.revision = Some(revision);
        self
    }

    /// Keys per page (tests and benchmarks; at least 1).
    pub fn with_page_keys(mut self, keys: i64) -> Self {
        self.limit = keys.max(1);
        self
    }

    /// The revision the pages are read at, once the first page has pinned it.
    pub fn revision(&self) -> Option<i64> {
        self.revision
    }

    /// The next page, or `None` after the last. A compacted pinned revision is an error
    /// (etcd's "required revision has been compacted"): start a new [`Pages`].
    pub async fn next(&mut self) -> Result<Option<Page>, etcd_client::Error> {
        if self.done {
            return Ok(None);
        }
        let mut resp = loop {
            let mut options = GetOptions::new()
                .with_range(self.end.clone())
                .with_limit(self.limit);
            if let Some(revision) = self.revision {
                options = options.with_revision(revision);
            }
            match self.kv.get(self.next_key.clone(), Some(options)).await {
                Ok(resp) => break resp,
                Err(e) if too_large(&e) && self.limit > 1 => self.limit = (self.limit / 2).max(1),
                Err(e) => return Err(e),
            }
        };
        let revision = *self
            .revision
            .get_or_insert_with(|| resp.header().map(|h| h.revision()).unwrap_or(0));
        let kvs = resp.take_kvs();
        match kvs.last() {
            Some(last) if resp.more() => {
                // The smallest key after the last one.
                self.next_key = last.key().to_vec();
                self.next_key.push(0);
            }
            _ => self.done = true,
        }
        Ok(Some(Page { revision, kvs }))
    }
}

/// A page was bigger than [`MAX_MESSAGE_BYTES`].
fn too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() as i32 == OUT_OF_RANGE)
}

/// The end of the range of keys starting with `prefix`: the prefix with its last byte that
/// is not 0xff incremented (and what follows dropped); `\0` (every key) if there is none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn the_range_end_follows_every_key_under_the_prefix() {
        assert_eq!(prefix_end(b"/roost/sites/"), b"/roost/sites0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }
}
