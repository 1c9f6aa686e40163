//! Every etcd read and write `roostctl` makes, in one place.
//!
//! Each call has a deadline: etcd-client connects lazily and a request to an etcd that is
//! not there would otherwise wait forever. A call that times out or cannot reach etcd
//! becomes [`Unreachable`], which `main` turns into exit code 3.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use etcd_client::{Client, Compare, Txn, TxnOp, TxnOpResponse};
use roost_proto::etcd::{self, EtcdAccess};
use roost_proto::paging::Pages;
use roost_proto::Layout;

/// etcd could not be reached (or did not answer in time).
#[derive(Debug)]
pub struct Unreachable {
    pub endpoints: String,
    pub detail: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot reach etcd at {} ({}): check that etcd is running there, \
             or give the right endpoints with --etcd URLS or $ROOST_ETCD",
            self.endpoints, self.detail
        )
    }
}

impl std::error::Error for Unreachable {}

/// One stored record: its name under the prefix (host or node id), value and revision.
#[derive(Clone, Debug)]
pub struct Kv {
    pub name: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// The sites and nodes as one consistent read.
pub struct Listing {
    pub sites: Vec<Kv>,
    pub nodes: Vec<Kv>,
}

/// A connected client plus the key layout.
pub struct Store {
    client: Client,
    layout: Layout,
    access: EtcdAccess,
    endpoints: String,
    timeout: Duration,
}

impl Store {
    /// Connect to `urls` (comma separated); `timeout` bounds every later call.
    pub async fn connect(
        access: &EtcdAccess,
        prefix: &str,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let urls = access.urls();
        let endpoints = etcd::endpoints(urls).join(",");
        if endpoints.is_empty() {
            anyhow::bail!(
                "--etcd is empty: give at least one URL, e.g. --etcd http://127.0.0.1:2379"
            );
        }
        let client = match tokio::time::timeout(timeout, access.connect()).await {
            Ok(Ok(client)) => client,
            Ok(Err(
                e @ (etcd_client::Error::InvalidUri(_) | etcd_client::Error::InvalidArgs(_)),
            )) => {
                anyhow::bail!("--etcd {urls:?} is not a usable list of URLs: {e}")
            }
            Ok(Err(e)) => return Err(failure(access, &endpoints, timeout, Some(e))),
            Err(_) => return Err(failure(access, &endpoints, timeout, None)),
        };
        Ok(Self {
            client,
            layout: Layout::new(prefix),
            access: access.clone(),
            endpoints,
            timeout,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The full key of a site; `name` is a canonical host (or, to reach a malformed
    /// record, the name exactly as listed).
    pub fn site_key(&self, name: &str) -> String {
        self.layout.site_key(name)
    }

    /// Every site and node record, read at one revision, in pages (see [`Store::site_pages`]).
    pub async fn list(&self) -> anyhow::Result<Listing> {
        let (revision, nodes) = self.nodes().await?;
        let mut pages = self.site_pages(revision);
        let mut sites = Vec::new();
        while let Some(page) = pages.next().await? {
            sites.extend(page);
        }
        Ok(Listing { sites, nodes })
    }

    /// Every node record, and the revision they were read at.
    pub async fn nodes(&self) -> anyhow::Result<(i64, Vec<Kv>)> {
        let prefix = self.layout.nodes_prefix();
        let mut pages = Pages::new(&self.client, &prefix);
        let mut nodes = Vec::new();
        let mut revision = 0;
        while let Some(page) = self.call(pages.next()).await? {
            revision = page.revision;
            nodes.extend(page.kvs.iter().map(|kv| to_kv(&prefix, kv)));
        }
        Ok((revision, nodes))
    }

    /// The site records page by page, all at `revision`: what `site ls` streams.
    pub fn site_pages(&self, revision: i64) -> SitePages<'_> {
        let prefix = self.layout.sites_prefix();
        SitePages {
            store: self,
            pages: Pages::new(&self.client, &prefix).at_revision(revision),
            prefix,
        }
    }

    /// Several keys (full keys, any prefix) in one read at `revision` (0: the newest), in
    /// the order asked; `None` where a key is absent.
    pub async fn get_keys(
        &self,
        keys: &[String],
        revision: i64,
    ) -> anyhow::Result<Vec<Option<Kv>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let options =
            (revision > 0).then(|| etcd_client::GetOptions::new().with_revision(revision));
        let txn = Txn::new().and_then(
            keys.iter()
                .map(|k| TxnOp::get(k.as_str(), options.clone()))
                .collect::<Vec<_>>(),
        );
        let mut c = self.client.clone();
        let resp = self.call(c.txn(txn)).await?;
        let gets: Vec<_> = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g),
                _ => None,
            })
            .collect();
        if gets.len() != keys.len() {
            anyhow::bail!(
                "etcd answered a read of {} keys with {} results",
                keys.len(),
                gets.len()
            );
        }
        Ok(gets
            .iter()
            .map(|g| g.kvs().first().map(|kv| to_kv("", kv)))
            .collect())
    }

    /// Apply `ops` if every compare holds. False: something changed since it was read.
    pub async fn commit(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> anyhow::Result<bool> {
        let txn = Txn::new().when(compares).and_then(ops);
        let mut c = self.client.clone();
        Ok(self.call(c.txn(txn)).await?.succeeded())
    }

    /// One site record, if present.
    pub async fn get_site(&self, name: &str) -> anyhow::Result<Option<Kv>> {
        let key = self.site_key(name);
        let mut c = self.client.clone();
        let resp = self.call(c.get(key.as_str(), None)).await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| to_kv(&self.layout.sites_prefix(), kv)))
    }

    /// Run one etcd call under the deadline, sorting failures into "unreachable" and the rest.
    async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(failure(
                &self.access,
                &self.endpoints,
                self.timeout,
                Some(e),
            )),
            Err(_) => Err(failure(&self.access, &self.endpoints, self.timeout, None)),
        }
    }
}

/// Site records, a page at a time (see [`Store::site_pages`]).
pub struct SitePages<'a> {
    store: &'a Store,
    pages: Pages,
    prefix: String,
}

impl SitePages<'_> {
    /// The next page of records, or `None` after the last.
    pub async fn next(&mut self) -> anyhow::Result<Option<Vec<Kv>>> {
        let page = self.store.call(self.pages.next()).await?;
        Ok(page.map(|p| p.kvs.iter().map(|kv| to_kv(&self.prefix, kv)).collect()))
    }
}

/// Turn an etcd error (or a timeout: `None`) into an error of the right kind.
fn failure(
    access: &EtcdAccess,
    endpoints: &str,
    timeout: Duration,
    e: Option<etcd_client::Error>,
) -> anyhow::Error {
    let unreachable = |detail: String| {
        anyhow::Error::new(Unreachable {
            endpoints: endpoints.to_string(),
            detail,
        })
    };
    // Certificates, credentials and permissions first: retrying can't fix those, and the
    // operator needs to know which option is wrong.
    if let Some(explained) = e.as_ref().map(|e| etcd::explain(e, access)) {
        if explained.fatal {
            return anyhow!("etcd: {explained}");
        }
    }
    match e {
        None => unreachable(format!("no answer within {}s", timeout.as_secs_f32())),
        Some(e) if is_unreachable(&e) => unreachable(short_reason(&e)),
        Some(e) => anyhow!("etcd refused the request: {}", short_reason(&e)),
    }
}

// gRPC status codes (tonic's `Code` is not re-exported by etcd-client; its discriminants
// are these numbers).
const CANCELLED: i32 = 1;
const DEADLINE_EXCEEDED: i32 = 4;
const UNIMPLEMENTED: i32 = 12;
const UNAVAILABLE: i32 = 14;

/// Errors that mean "no etcd to talk to there (or it has no leader)", as opposed to an
/// answer from etcd. A status with a source was made up by the client from a transport
/// failure (e.g. the server there is not HTTP/2); etcd's own answers carry none. A plain
/// HTTP server answers "unimplemented".
fn is_unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            std::error::Error::source(s).is_some()
                || matches!(
                    s.code() as i32,
                    CANCELLED | DEADLINE_EXCEEDED | UNIMPLEMENTED | UNAVAILABLE
                )
        }
        _ => false,
    }
}

/// "tcp connect error: Connection refused (os error 111)" rather than tonic's nested
/// debug dump: the first message and the innermost cause, which together say what failed.
fn short_reason(e: &etcd_client::Error) -> String {
    let (top, mut root): (String, &dyn std::error::Error) = match e {
        etcd_client::Error::GRpcStatus(s) if s.code() as i32 == UNIMPLEMENTED => {
            return format!(
                "the server there does not speak etcd's v3 API: {}",
                s.message()
            );
        }
        etcd_client::Error::GRpcStatus(s) if !s.message().is_empty() => {
            (s.message().to_string(), s)
        }
        other => (other.to_string(), other),
    };
    while let Some(next) = root.source() {
        root = next;
    }
    let root = root.to_string();
    if root == top || top.contains(&root) {
        top
    } else {
        format!("{top}: {root}")
    }
}

fn to_kv(prefix: &str, kv: &etcd_client::KeyValue) -> Kv {
    let key = String::from_utf8_lossy(kv.key());
    Kv {
        name: key.strip_prefix(prefix).unwrap_or(&key).to_string(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
    }
}
