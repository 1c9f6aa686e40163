//! Connecting to etcd the same way in every component.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

/// The endpoints used when neither `--etcd` nor `$ROOST_ETCD` says otherwise.
pub const DEFAULT_ENDPOINTS: &str = "http://127.0.0.1:2379";

/// Split `--etcd` (comma-separated URLs) into endpoints.
pub fn endpoints(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Options that notice a dead etcd within seconds (HTTP/2 keep-alive), so watches are
/// re-established promptly instead of hanging on a half-open connection.
pub fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3))
        .with_keep_alive_while_idle(true)
}

/// Connect once (the client reconnects lazily afterwards).
pub async fn connect(urls: &str) -> Result<Client, etcd_client::Error> {
    Client::connect(endpoints(urls), Some(connect_options())).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn endpoints_are_split_and_trimmed() {
        assert_eq!(
            super::endpoints("http://a:1, http://b:2,"),
            vec!["http://a:1".to_string(), "http://b:2".to_string()]
        );
    }
}
