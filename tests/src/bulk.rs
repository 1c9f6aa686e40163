//! Writing many site records fast, as an operator's bulk import would: transactions of
//! [`PUTS_PER_TXN`] puts, a few in flight at once. Used by the scale test and the
//! routing-scale benchmark.

use etcd_client::{Client, Txn, TxnOp};

/// etcd's default `--max-txn-ops`.
pub const PUTS_PER_TXN: usize = 128;
/// Transactions in flight at once.
const STREAMS: usize = 8;

/// Put every `(key, value)` in batched transactions; panics on an etcd error.
pub fn put_all(etcd_url: &str, records: Vec<(String, String)>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let client = Client::connect([etcd_url], None)
            .await
            .expect("connect to etcd");
        let batches: Vec<Vec<(String, String)>> = records
            .chunks(PUTS_PER_TXN)
            .map(<[(String, String)]>::to_vec)
            .collect();
        let per_stream = batches.len().div_ceil(STREAMS).max(1);
        let mut tasks = tokio::task::JoinSet::new();
        for group in batches.chunks(per_stream) {
            let mut kv = client.kv_client();
            let group = group.to_vec();
            tasks.spawn(async move {
                for batch in group {
                    let ops: Vec<TxnOp> = batch
                        .into_iter()
                        .map(|(k, v)| TxnOp::put(k, v, None))
                        .collect();
                    kv.txn(Txn::new().and_then(ops))
                        .await
                        .expect("write a batch of records");
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("bulk writer task");
        }
    });
}

/// The record the routing-scale benchmark loads N of: ~170 bytes with one alias, the size the
/// scale issue measured with. Site `i` is `site-{i:07}.bench.example`, its alias `www.` that.
pub fn bench_site_record(i: usize) -> String {
    serde_json::json!({
        "user": "roost-bench",
        "app": "app:application",
        "dir": format!("/srv/sites/site-{i:07}"),
        "aliases": [format!("www.site-{i:07}.bench.example")],
        "idle_timeout": 300,
        "env": {"APP_ENV": "production"},
    })
    .to_string()
}
