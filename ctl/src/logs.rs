//! `site logs HOST`: the end of a site's worker output (its stdout and stderr), read from
//! the admin port of the agent that runs it.
//!
//! The node is the one the proxies send the site to now (the same ranking as `where`), or
//! the one `--node` names. The request is one HTTP/1.1 GET (hyper; the body read is capped),
//! `http://<admin>/sites/<host>/log?lines=N`, with a proof of the agents' shared secret in
//! `x-roost-admin-proof` (an HMAC bound to that path and the time; the secret itself never
//! goes to an address read from etcd). The agent answers 200 with the lines, 404 when the site has no log on
//! that node, 403 without the right secret. A node that cannot be reached (or does not
//! answer HTTP in time) is [`NodeUnreachable`], which `main` turns into exit code 3.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use roost_proto::headers::{admin_proof, ADMIN_PROOF};
use roost_proto::NodeInfo;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::catalog::Catalog;
use crate::output;
use crate::sites::canonical;
use crate::store::Store;

/// Where the secret is looked for when neither `--secret-file` nor `$ROOST_SECRET_FILE` is given.
pub const DEFAULT_SECRET_FILE: &str = "/etc/roost/secret";

/// At most this much of an agent's answer is read (the agent sends a few hundred KiB at most).
const MAX_RESPONSE_BYTES: usize = 32 << 20;

/// A node's agent could not be reached, or did not answer HTTP within the deadline.
#[derive(Debug)]
pub struct NodeUnreachable {
    pub node: String,
    pub addr: String,
    pub detail: String,
    /// What else the operator can try, starting with "; " (or empty).
    pub hint: String,
}

impl fmt::Display for NodeUnreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot reach the agent of node {} at its admin address {} ({}): \
             check that roost-agent runs there and that this machine may reach its admin port{}",
            self.node, self.addr, self.detail, self.hint
        )
    }
}

impl std::error::Error for NodeUnreachable {}

/// What `site logs` was asked.
pub struct LogsRequest<'a> {
    pub host: &'a str,
    pub lines: u32,
    pub node: Option<&'a str>,
    /// `--secret-file` (or `$ROOST_SECRET_FILE`).
    pub secret_file: Option<&'a Path>,
    pub timeout: Duration,
}

#[derive(Serialize)]
struct LogsJson<'a> {
    /// The site whose log this is (the site's key, also when HOST was an alias).
    site: &'a str,
    node: &'a str,
    admin: &'a str,
    lines: Vec<&'a str>,
}

pub async fn logs(store: &Store, req: &LogsRequest<'_>, json: bool) -> anyhow::Result<()> {
    let host = canonical(req.host)?;
    // Read the secret first: a bad --secret-file is an error before anything is asked.
    let secret = Secret::find(req.secret_file)?;
    let catalog = Catalog::new(store.list().await?);
    let target = choose(&catalog, &host, req.node)?;
    let admin = admin_address(target.node, target.info)?;
    let path = format!("/sites/{}/log?lines={}", target.site, req.lines);
    let response = match tokio::time::timeout(
        req.timeout,
        get(&admin, &path, secret.value.as_deref()),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(unreachable(&target, &admin, e.to_string())),
        Err(_) => {
            let detail = format!("no answer within {}s", req.timeout.as_secs_f32());
            return Err(unreachable(&target, &admin, detail));
        }
    };
    let body = String::from_utf8_lossy(&response.body);
    match response.status {
        200 => {}
        404 => return Err(no_log(&target, &body)),
        401 | 403 => bail!(
            "node {} refused to show the log ({}): {}",
            target.node,
            response.status,
            secret.advice()
        ),
        status => bail!(
            "node {} answered {status} to {path}: {}",
            target.node,
            first_line(&body)
        ),
    }
    if json {
        return output::json(&LogsJson {
            site: &target.site,
            node: target.node,
            admin: &admin,
            lines: body.lines().collect(),
        });
    }
    if body.is_empty() || body.ends_with('\n') {
        output::emit(&body)
    } else {
        output::line(&body)
    }
}

/// The node asked, and why it was chosen.
struct Target<'a> {
    /// The site's key (the name its log is kept under).
    site: String,
    node: &'a str,
    info: &'a NodeInfo,
    /// True when `--node` chose the node, false when placement did.
    chosen: bool,
    /// The other registered nodes, for the operator to try with `--node`.
    others: Vec<&'a str>,
}

/// The node to ask: `--node` if given (any registered node, draining or not), else the
/// first in the site's ranking, as the proxies send it.
fn choose<'a>(catalog: &'a Catalog, host: &str, node: Option<&str>) -> anyhow::Result<Target<'a>> {
    let claims = catalog.resolve(host);
    if claims.len() > 1 {
        let all: Vec<&str> = claims.iter().map(|(s, _)| s.host.as_str()).collect();
        eprintln!(
            "roostctl: warning: {host} is claimed by several sites ({}); showing {}",
            all.join(", "),
            all[0]
        );
    }
    let site = claims.first().map(|(s, _)| s);
    let others = |except: &str| -> Vec<&'a str> {
        catalog
            .nodes
            .iter()
            .filter(|n| n.info.is_ok() && n.id != except)
            .map(|n| n.id.as_str())
            .collect()
    };
    if let Some(id) = node {
        let Some(entry) = catalog.nodes.iter().find(|n| n.id == id) else {
            let known = others("");
            bail!(
                "no node {id} is registered: {}",
                if known.is_empty() {
                    "no node is live (see `roostctl node ls`)".to_string()
                } else {
                    format!("the live nodes are {}", known.join(", "))
                }
            );
        };
        let info = entry.info.as_ref().map_err(|e| {
            anyhow!("node {id} has an invalid record, so its admin address is unknown: {e}")
        })?;
        return Ok(Target {
            // A removed site's log may still be on the node: ask under the name given.
            site: site.map_or_else(|| host.to_string(), |s| s.host.clone()),
            node: entry.id.as_str(),
            info,
            chosen: true,
            others: others(id),
        });
    }
    let Some(site) = site else {
        bail!(
            "no site serves {host}: to read what a removed site left on a node, \
             name the node with `--node ID` (see `roostctl node ls`)"
        );
    };
    let spec = site.spec.as_ref().map_err(|e| {
        anyhow!(
            "site {} has an invalid record, so it is placed nowhere: {e}; \
             to read its log on a node, name the node with `--node ID`",
            site.host
        )
    })?;
    let ranked = catalog.ranked(&site.host, spec);
    let Some((id, info)) = ranked.first().copied() else {
        let live = catalog.live_nodes().len();
        if live == 0 {
            bail!("no node is live, so no agent can be asked for the log of {host} (see `roostctl node ls`)");
        }
        bail!(
            "every live node ({live}) is draining, so {host} is placed nowhere: \
             name the node to ask with `--node ID` (see `roostctl node ls`)"
        );
    };
    Ok(Target {
        site: site.host.clone(),
        node: id,
        info,
        chosen: false,
        others: others(id),
    })
}

/// Where to reach a node's admin port. An agent that listens on every interface publishes
/// `0.0.0.0:port` (or `[::]:port`); then the node's own address is used with that port.
fn admin_address(id: &str, info: &NodeInfo) -> anyhow::Result<String> {
    let Some(admin) = info.admin.as_deref().filter(|a| !a.is_empty()) else {
        bail!(
            "node {id} does not publish an admin address (its agent is older than `site logs`): \
             read the log on the node, under the agent's --state-dir, in logs/<host>.log"
        );
    };
    match admin.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => match info.addr.parse::<SocketAddr>() {
            Ok(node) => Ok(SocketAddr::new(node.ip(), a.port()).to_string()),
            Err(_) => Ok(admin.to_string()),
        },
        _ => Ok(admin.to_string()),
    }
}

fn unreachable(target: &Target, admin: &str, detail: String) -> anyhow::Error {
    let hint = if target.chosen || target.others.is_empty() {
        String::new()
    } else {
        format!(
            "; if that node is down, the proxies send {} to the next node in `roostctl where {}`: \
             read the log there with `--node ID`",
            target.site, target.site
        )
    };
    anyhow::Error::new(NodeUnreachable {
        node: target.node.to_string(),
        addr: admin.to_string(),
        detail,
        hint,
    })
}

/// The 404 message: what the agent said, and (for the placed node) that `--node` reads
/// another node's log, e.g. where the site ran before the nodes changed.
fn no_log(target: &Target, body: &str) -> anyhow::Error {
    let said = first_line(body);
    let said = if said.is_empty() {
        String::new()
    } else {
        format!(" (the agent said: {said})")
    };
    let mut msg = if target.chosen {
        format!("node {} has no log for {}{said}", target.node, target.site)
    } else {
        format!(
            "node {}, where {} is placed, has no log for it{said}",
            target.node, target.site
        )
    };
    if !target.others.is_empty() {
        msg += &format!(
            "; to read the log on another node, add `--node ID` (other nodes: {})",
            target.others.join(", ")
        );
    } else if !target.chosen {
        msg += "; `--node ID` reads the log on a given node (see `roostctl node ls`)";
    }
    anyhow!(msg)
}

fn first_line(body: &str) -> &str {
    body.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// The agents' shared secret, and where it came from.
struct Secret {
    value: Option<String>,
    /// Where the secret was read, or why none was sent.
    source: String,
}

impl Secret {
    /// `--secret-file`/`$ROOST_SECRET_FILE` must be readable; the default file is used when
    /// it exists, and when it exists but cannot be read the request goes without a secret.
    fn find(given: Option<&Path>) -> anyhow::Result<Self> {
        if let Some(path) = given {
            let value = read_secret(path).map_err(|e| anyhow!("cannot use it: {e}"))?;
            return Ok(Self {
                value: Some(value),
                source: format!("the secret in {} was not accepted", path.display()),
            });
        }
        let default = PathBuf::from(DEFAULT_SECRET_FILE);
        if !default.exists() {
            return Ok(Self {
                value: None,
                source: format!(
                    "no secret was sent (no --secret-file, no $ROOST_SECRET_FILE, no {DEFAULT_SECRET_FILE})"
                ),
            });
        }
        Ok(match read_secret(&default) {
            Ok(value) => Self {
                value: Some(value),
                source: format!("the secret in {DEFAULT_SECRET_FILE} was not accepted"),
            },
            Err(e) => Self {
                value: None,
                source: format!(
                    "no secret was sent: {DEFAULT_SECRET_FILE} could not be read ({e})"
                ),
            },
        })
    }

    fn advice(&self) -> String {
        format!(
            "{}; give the file the agents were started with, as --secret-file FILE or $ROOST_SECRET_FILE",
            self.source
        )
    }
}

/// A secret file's content, by the rule proxies and agents read it with.
fn read_secret(path: &Path) -> Result<String, String> {
    let secret = roost_proto::headers::read_secret(path).map_err(|e| e.to_string())?;
    // Validated as one line of visible characters, so it is text.
    Ok(String::from_utf8_lossy(&secret).into_owned())
}

/// An agent's answer.
#[derive(Debug)]
struct Response {
    status: u16,
    body: Vec<u8>,
}

/// One `GET` over a fresh connection (`Connection: close`). The caller bounds it in time.
async fn get(addr: &str, path: &str, auth: Option<&str>) -> std::io::Result<Response> {
    get_capped(addr, path, auth, MAX_RESPONSE_BYTES).await
}

/// [`get`], reading at most `cap` bytes of body: a larger answer is an error, not memory.
async fn get_capped(
    addr: &str,
    path: &str,
    auth: Option<&str>,
    cap: usize,
) -> std::io::Result<Response> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| bad(format!("HTTP handshake: {e}")))?;
    let driver = tokio::spawn(connection);
    let mut request = http::Request::get(path)
        .header(http::header::HOST, addr)
        .header(
            http::header::USER_AGENT,
            concat!("roostctl/", env!("CARGO_PKG_VERSION")),
        )
        .header(http::header::ACCEPT, "text/plain")
        .header(http::header::CONNECTION, "close");
    if let Some(secret) = auth {
        // Never the secret itself: the address came from etcd, and a forged node record
        // would collect it. A proof bound to this path, good for a minute, is all it gets.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        request = request.header(ADMIN_PROOF, admin_proof(secret.as_bytes(), path, now));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| bad(format!("cannot build the request: {e}")))?;
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| bad(format!("no HTTP answer: {e}")))?;
    let status = answer.status().as_u16();
    let body = Limited::new(answer.into_body(), cap)
        .collect()
        .await
        .map_err(|e| bad(format!("reading the answer (at most {cap} bytes): {e}")))?
        .to_bytes();
    driver.abort();
    Ok(Response {
        status,
        body: body.to_vec(),
    })
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Kv, Listing};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-shot HTTP server: returns its address and the request it received.
    async fn serve_once(answer: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(req).unwrap()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn the_request_carries_path_host_close_and_a_proof_never_the_secret() {
        let (addr, server) = serve_once(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nhi\n",
        )
        .await;
        let r = get(&addr, "/sites/a.example/log?lines=7", Some("s3cret"))
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hi\n"[..]));
        let req = server.await.unwrap();
        assert!(
            req.starts_with("GET /sites/a.example/log?lines=7 HTTP/1.1\r\n"),
            "{req}"
        );
        let lower = req.to_ascii_lowercase();
        assert!(lower.contains(&format!("\r\nhost: {addr}\r\n")), "{req}");
        assert!(lower.contains("\r\nconnection: close\r\n"), "{req}");
        // A proof the agent checks against the path, not the secret itself.
        assert!(!req.contains("s3cret"), "{req}");
        let proof = lower
            .lines()
            .find_map(|l| l.strip_prefix("x-roost-admin-proof: "))
            .unwrap_or_else(|| panic!("no proof header: {req}"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(roost_proto::headers::admin_proof_valid(
            b"s3cret",
            "/sites/a.example/log?lines=7",
            proof.as_bytes(),
            now
        ));

        let (addr, server) =
            serve_once("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nto eof\n").await;
        let r = get(&addr, "/x", None).await.unwrap();
        assert_eq!(r.body, b"to eof\n");
        assert!(!server.await.unwrap().contains("x-roost-admin-proof"));
    }

    #[tokio::test]
    async fn chunked_answers_are_read_and_what_is_not_http_is_an_error() {
        let (addr, _) = serve_once(
            "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nno \r\n4\r\nlog\n\r\n0\r\n\r\n",
        )
        .await;
        let r = get(&addr, "/x", None).await.unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"no log\n"[..]));
        let (addr, _) = serve_once("SSH-2.0-OpenSSH_9.2\r\n").await;
        assert!(get(&addr, "/x", None).await.is_err());
        let (addr, _) = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort").await;
        assert!(get(&addr, "/x", None).await.is_err(), "a truncated body");
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_cap_is_refused() {
        let big: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n{}\r\n0\r\n\r\n",
                "x".repeat(1024)
            )
            .into_boxed_str(),
        );
        let (addr, _) = serve_once(big).await;
        let e = get_capped(&addr, "/x", None, 512).await.unwrap_err();
        assert!(e.to_string().contains("at most 512 bytes"), "{e}");
        let (addr, _) = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        assert_eq!(
            get_capped(&addr, "/x", None, 512).await.unwrap().body,
            b"hello"
        );
    }

    fn catalog(nodes: &[(&str, &str)]) -> Catalog {
        let kv = |name: &str, value: &str| Kv {
            name: name.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
        };
        Catalog::new(Listing {
            sites: vec![
                kv(
                    "a.example",
                    r#"{"user":"alice","app":"a:b","dir":"/a","aliases":["www.a.example"],"node":"n2"}"#,
                ),
                kv("bad.example", r#"{"user":1}"#),
            ],
            nodes: nodes.iter().map(|(id, v)| kv(id, v)).collect(),
        })
    }

    const N1: &str = r#"{"addr":"10.0.0.1:7100","admin":"0.0.0.0:7101"}"#;
    const N2: &str = r#"{"addr":"10.0.0.2:7100","admin":"127.0.0.1:7201"}"#;

    #[test]
    fn the_placed_node_is_asked_unless_node_says_otherwise() {
        let c = catalog(&[("n1", N1), ("n2", N2)]);
        let t = choose(&c, "www.a.example", None).unwrap();
        assert_eq!(
            (t.site.as_str(), t.node, t.chosen),
            ("a.example", "n2", false)
        );
        assert_eq!(t.others, ["n1"]);
        assert_eq!(admin_address(t.node, t.info).unwrap(), "127.0.0.1:7201");
        let t = choose(&c, "a.example", Some("n1")).unwrap();
        assert_eq!((t.node, t.chosen), ("n1", true));
        // 0.0.0.0 means "every interface": reach it at the node's own address.
        assert_eq!(admin_address(t.node, t.info).unwrap(), "10.0.0.1:7101");
        // A removed site can still be read on a named node, not without one.
        assert_eq!(
            choose(&c, "gone.example", Some("n1")).unwrap().site,
            "gone.example"
        );
        let e = choose(&c, "gone.example", None).err().unwrap().to_string();
        assert!(e.contains("--node"), "{e}");
        let e = choose(&c, "bad.example", None).err().unwrap().to_string();
        assert!(e.contains("invalid record") && e.contains("--node"), "{e}");
        let e = choose(&c, "a.example", Some("n9"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("n1, n2"), "{e}");
        let e = choose(&catalog(&[]), "a.example", None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no node is live"), "{e}");
    }

    #[test]
    fn a_node_without_an_admin_address_is_explained() {
        let c = catalog(&[("n2", r#"{"addr":"10.0.0.2:7100"}"#)]);
        let t = choose(&c, "a.example", None).unwrap();
        let e = admin_address(t.node, t.info).unwrap_err().to_string();
        assert!(e.contains("does not publish an admin address"), "{e}");
    }

    #[test]
    fn a_missing_log_on_the_placed_node_points_at_node() {
        let c = catalog(&[("n1", N1), ("n2", N2)]);
        let t = choose(&c, "a.example", None).unwrap();
        let e = no_log(&t, "no log for a.example on this node\n").to_string();
        assert!(
            e.starts_with("node n2, where a.example is placed, has no log"),
            "{e}"
        );
        assert!(
            e.contains("the agent said: no log for a.example on this node"),
            "{e}"
        );
        assert!(e.contains("--node ID` (other nodes: n1)"), "{e}");
    }

    #[test]
    fn secrets_are_trimmed_and_a_bad_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("roostctl-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "  0123456789abcdef\n").unwrap();
        let s = Secret::find(Some(&file)).unwrap();
        assert_eq!(s.value.as_deref(), Some("0123456789abcdef"));
        std::fs::write(&file, "\n").unwrap();
        assert!(Secret::find(Some(&file)).is_err());
        std::fs::write(&file, "two\nlines").unwrap();
        assert!(Secret::find(Some(&file)).is_err());
        assert!(Secret::find(Some(&dir.join("missing"))).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
