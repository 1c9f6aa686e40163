//! The contract every Roost component shares.
//!
//! - [`keys`]: where things live in etcd.
//! - [`site`] and [`node`]: the records stored there, with validation that names the bad field.
//! - [`env_vars`]: a site's environment variables, stored compactly.
//! - [`site_route`]: the part of a site record the proxy keeps.
//! - [`host`]: host-name canonicalisation, used for keys and for every `Host` header.
//! - [`hosts`]: host → site resolution (keys, aliases, wildcards), for proxy and roostctl.
//! - [`placement`]: which node serves a site, as a pure function of the site and the live nodes.
//! - [`headers`]: the internal headers between proxy and agent, and the proxy's credential.
//! - [`informer`]: list-then-watch over an etcd prefix, publishing immutable snapshots.
//! - [`paging`]: reading a prefix in pages at one revision.
//! - [`pages`]: the one style of error page both write themselves.
//! - [`request_rules`]: what the edge accepts in a request head, body framing and trailers.
//! - [`etcd`]: connecting to etcd the same way everywhere.
//! - [`etcd_security`]: the TLS and credential options for a secured etcd.
//! - [`cert`]: the TLS certificates the proxy serves by SNI name.

pub mod cert;
pub mod env_vars;
pub mod etcd;
pub mod etcd_security;
pub mod headers;
pub mod host;
pub mod hosts;
pub mod informer;
pub mod keys;
pub mod node;
pub mod pages;
pub mod paging;
pub mod placement;
pub mod request_rules;
pub mod site;
pub mod site_route;

pub use cert::CertRecord;
pub use host::{canonical_host, HostError};
pub use informer::{Informer, Snapshot};
pub use keys::Layout;
pub use node::NodeInfo;
pub use site::{SiteSpec, SpecError};
pub use site_route::SiteRoute;
