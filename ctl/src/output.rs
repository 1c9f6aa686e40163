//! Writing results to stdout.
//!
//! `println!` panics when the reader goes away (`roostctl site ls | head -1`); a closed pipe
//! is a normal way for a pager or script to stop reading, so it ends output quietly instead.

use std::io::{ErrorKind, Write};

use serde::Serialize;

/// Write `text` to stdout as is.
pub fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Write one line.
pub fn line(text: &str) -> anyhow::Result<()> {
    emit(&format!("{text}\n"))
}

/// Write a value as pretty JSON (the `--json` output of every command).
pub fn json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    line(&serde_json::to_string_pretty(value)?)
}
