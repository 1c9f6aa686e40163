//! The fast path of a site whose worker is ready: one atomic word per site that requests
//! claim and release without waking the site's actor. The actor is messaged only when its
//! state must change (issue 12: three cross-runtime wake-ups per request were most of the
//! agent's cost, and put the control runtime on every warm request's path).
//!
//! ## The word
//!
//! ```text
//!  63            32   31     30     29                 0
//! ┌────────────────┬──────┬───────┬────────────────────┐
//! │     epoch      │ OPEN │ WATCH │       count        │
//! └────────────────┴──────┴───────┴────────────────────┘
//! ```
//!
//! - `epoch` names the current worker's term. Every ticket carries the epoch it was issued
//!   in. Only the actor changes it, and only by *retiring* the current worker.
//! - `count`: tickets of this epoch not yet released, whether a request claimed them here or
//!   the actor issued them (a request that waited for a start).
//! - `OPEN`: requests may claim without asking the actor.
//! - `WATCH`: the actor wants a message (`Quiet`) when `count` falls to 0.
//!
//! ## Who may change what, and how
//!
//! | who | step | rule |
//! | --- | --- | --- |
//! | request | claim | compare-and-swap `count + 1`, only while `OPEN`, the epoch is the one of the route the request read, and `count` is under the site's limit; otherwise ask the actor |
//! | request | release | compare-and-swap `count - 1` while the epoch is still its own (if that makes `count` 0 under `WATCH`, clear `WATCH` in the same swap and send `Quiet`); if the epoch moved on, send `Release`: the actor counts that ticket now |
//! | actor | issue a ticket | `count + 1` on the current epoch, open or not |
//! | actor | open, close | set or clear `OPEN`; nothing else changes |
//! | actor | stop an idle worker | clear `OPEN` by a compare-and-swap that requires `count == 0`, then retire |
//! | actor | wait for the last request | set `WATCH` by a compare-and-swap that requires `count > 0` |
//! | actor | retire | swap the word for `(epoch + 1, closed, 0)`; the old `count` is now the actor's to track |
//!
//! What follows from it:
//! 1. Every ticket is counted in exactly one place: in the word while its epoch is current,
//!    by the actor once the epoch is retired (the swap hands over the count at one instant;
//!    a release that lost the race sees the new epoch and messages the actor).
//! 2. No claim is granted in a retired epoch (the claim's swap compares the epoch), so a
//!    worker the actor has decided to stop gets no new request; the requests it already has
//!    are the ones the retire handed over, which the actor waits for (draining, give-back)
//!    or abandons on purpose (crash, removal, shutdown, a stuck worker).
//! 3. Once `OPEN` is clear, `count` only falls, except by the actor's own tickets: the actor
//!    takes every "nothing in flight" decision with the gate closed, or (idle stop,
//!    eviction) with the swap that closes it only at `count == 0`.
//! 4. `WATCH` is set only while `count > 0`, and the release that takes `count` to 0 sees
//!    it: the actor never sleeps through the end of the last request it waits for.
//! 5. Epochs wrap after 2³² workers of one site; a ticket would have to outlive that many
//!    to be confused with a current one.

use std::sync::atomic::{AtomicU64, Ordering};

const COUNT_MASK: u64 = (1 << 30) - 1;
const WATCH: u64 = 1 << 30;
const OPEN: u64 = 1 << 31;
const EPOCH_SHIFT: u32 = 32;

/// The most tickets one epoch can count.
pub const MAX_COUNT: u32 = COUNT_MASK as u32;

fn epoch_of(word: u64) -> u32 {
    (word >> EPOCH_SHIFT) as u32
}

fn count_of(word: u64) -> u32 {
    (word & COUNT_MASK) as u32
}

/// What a request's claim got.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    Granted,
    /// Open and current, but at the site's limit of concurrent requests.
    Full,
    /// Closed, or the route read is of an earlier epoch: ask the actor.
    Closed,
}

/// What a ticket's release must tell the actor.
#[derive(Debug, PartialEq, Eq)]
pub enum Released {
    /// Counted off here; `quiet` when it was the last one and the actor asked to know.
    Counted { quiet: bool },
    /// Its epoch was retired: the actor counts this ticket and must be told.
    Retired,
}

/// One site's gate (see the module comment for the protocol).
pub struct Gate {
    word: AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    /// Epoch 1, closed, nothing counted.
    pub fn new() -> Self {
        Self {
            word: AtomicU64::new(1 << EPOCH_SHIFT),
        }
    }

    /// Step the word with `f` until the swap succeeds or `f` declines (`Err`).
    fn update<T>(&self, mut f: impl FnMut(u64) -> Result<(u64, T), T>) -> T {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let (next, out) = match f(word) {
                Ok(step) => step,
                Err(out) => return out,
            };
            match self
                .word
                .compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return out,
                Err(now) => word = now,
            }
        }
    }

    // The request's side.

    /// Claim one request on `epoch`'s worker if the gate is open and fewer than `limit`
    /// requests of this epoch are in flight.
    pub fn claim(&self, epoch: u32, limit: u32) -> Claim {
        self.update(|w| {
            if epoch_of(w) != epoch || w & OPEN == 0 {
                Err(Claim::Closed)
            } else if count_of(w) >= limit.min(MAX_COUNT) {
                Err(Claim::Full)
            } else {
                Ok((w + 1, Claim::Granted))
            }
        })
    }

    /// End one request of `epoch`.
    pub fn release(&self, epoch: u32) -> Released {
        self.update(|w| {
            if epoch_of(w) != epoch {
                return Err(Released::Retired);
            }
            debug_assert!(count_of(w) > 0, "a release with nothing counted");
            let next = w.saturating_sub(1);
            if count_of(next) == 0 && next & WATCH != 0 {
                Ok((next & !WATCH, Released::Counted { quiet: true }))
            } else {
                Ok((next, Released::Counted { quiet: false }))
            }
        })
    }

    // The actor's side.

    pub fn epoch(&self) -> u32 {
        epoch_of(self.word.load(Ordering::Acquire))
    }

    /// Tickets of the current epoch not yet released.
    pub fn in_flight(&self) -> u32 {
        count_of(self.word.load(Ordering::Acquire))
    }

    pub fn is_open(&self) -> bool {
        self.word.load(Ordering::Acquire) & OPEN != 0
    }

    /// Count a ticket the actor issues on the current epoch, if fewer than `limit` are.
    pub fn add(&self, limit: u32) -> bool {
        self.update(|w| {
            if count_of(w) >= limit.min(MAX_COUNT) {
                Err(false)
            } else {
                Ok((w + 1, true))
            }
        })
    }

    pub fn open(&self) {
        self.word.fetch_or(OPEN, Ordering::AcqRel);
    }

    pub fn close(&self) {
        self.word.fetch_and(!OPEN, Ordering::AcqRel);
    }

    /// Close the gate if nothing is in flight, in one step; false (and unchanged) otherwise.
    pub fn close_if_idle(&self) -> bool {
        self.update(|w| {
            if count_of(w) == 0 {
                Ok((w & !OPEN, true))
            } else {
                Err(false)
            }
        })
    }

    /// Ask for `Quiet` when the last request in flight ends; false when none is in flight.
    pub fn watch(&self) -> bool {
        self.update(|w| {
            if count_of(w) == 0 {
                Err(false)
            } else if w & WATCH != 0 {
                Err(true)
            } else {
                Ok((w | WATCH, true))
            }
        })
    }

    /// End the current epoch: closed, nothing counted, no watch. Returns how many of its
    /// tickets were still in flight; their releases now go to the actor.
    pub fn retire(&self) -> u32 {
        // Only the actor changes the epoch, so it can be read before the swap.
        let next = u64::from(self.epoch().wrapping_add(1)) << EPOCH_SHIFT;
        count_of(self.word.swap(next, Ordering::AcqRel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU32};
    use std::sync::{mpsc, Arc, Mutex};
    use std::time::Duration;

    #[test]
    fn a_claim_needs_the_gate_open_the_epoch_current_and_room_under_the_limit() {
        let g = Gate::new();
        let e = g.epoch();
        assert_eq!(g.claim(e, 2), Claim::Closed, "a new gate is closed");
        g.open();
        assert_eq!(g.claim(e + 1, 2), Claim::Closed, "a route of another epoch");
        assert_eq!(g.claim(e, 2), Claim::Granted);
        assert_eq!(g.claim(e, 2), Claim::Granted);
        assert_eq!(g.claim(e, 2), Claim::Full);
        assert_eq!(g.in_flight(), 2);
        assert_eq!(g.release(e), Released::Counted { quiet: false });
        assert_eq!(g.claim(e, 2), Claim::Granted);
        g.close();
        assert_eq!(g.claim(e, 2), Claim::Closed);
        assert!(g.add(3), "the actor still issues tickets on a closed gate");
        assert!(!g.add(3), "but not past the limit it asks for");
        assert_eq!(g.in_flight(), 3);
    }

    #[test]
    fn retiring_hands_the_count_to_the_actor_and_later_releases_go_there() {
        let g = Gate::new();
        let e = g.epoch();
        g.open();
        assert_eq!(g.claim(e, u32::MAX), Claim::Granted);
        assert_eq!(g.claim(e, u32::MAX), Claim::Granted);
        assert!(g.watch());
        assert_eq!(g.retire(), 2);
        assert_eq!(g.epoch(), e + 1);
        assert!(
            !g.is_open() && g.in_flight() == 0,
            "closed, nothing counted"
        );
        assert_eq!(g.release(e), Released::Retired);
        assert_eq!(g.release(e), Released::Retired);
        g.open();
        assert_eq!(g.claim(e, u32::MAX), Claim::Closed, "the old epoch is gone");
        assert_eq!(g.claim(e + 1, u32::MAX), Claim::Granted);
        assert_eq!(
            g.release(e + 1),
            Released::Counted { quiet: false },
            "the retire cleared the old watch"
        );
    }

    #[test]
    fn the_last_release_under_watch_is_quiet_once_and_idle_close_needs_zero() {
        let g = Gate::new();
        let e = g.epoch();
        assert!(!g.watch(), "nothing in flight: nothing to wait for");
        g.open();
        assert_eq!(g.claim(e, u32::MAX), Claim::Granted);
        assert_eq!(g.claim(e, u32::MAX), Claim::Granted);
        assert!(!g.close_if_idle());
        assert!(g.is_open(), "a failed idle close changes nothing");
        assert!(g.watch());
        assert_eq!(g.release(e), Released::Counted { quiet: false });
        assert_eq!(g.release(e), Released::Counted { quiet: true });
        assert_eq!(g.claim(e, u32::MAX), Claim::Granted);
        assert_eq!(
            g.release(e),
            Released::Counted { quiet: false },
            "the watch was used up"
        );
        assert!(g.close_if_idle());
        assert!(!g.is_open());
        assert_eq!(g.claim(e, u32::MAX), Claim::Closed);
    }

    /// Per epoch: claims granted, releases counted off in the word, releases sent to the
    /// actor, and tickets the actor took over at retire.
    #[derive(Default)]
    struct Books {
        granted: HashMap<u32, u64>,
        counted: HashMap<u32, u64>,
        told: HashMap<u32, u64>,
        taken: HashMap<u32, u64>,
    }

    /// Claimers on four threads against an actor that opens, retires, and stops its worker
    /// when idle, as fast as it can. Every ticket must end up counted exactly once, and an
    /// idle stop must find nothing in flight: a claim granted after the actor decided would
    /// show up as a ticket the actor was told about but never took over.
    #[test]
    fn claims_racing_retires_and_idle_stops_are_each_counted_exactly_once() {
        let gate = Arc::new(Gate::new());
        // The route: the epoch requests read before they claim.
        let route = Arc::new(AtomicU32::new(gate.epoch()));
        let stop = Arc::new(AtomicBool::new(false));
        let books = Arc::new(Mutex::new(Books::default()));
        let claimers: Vec<_> = (0..4)
            .map(|seed| {
                let (gate, route, stop, books) =
                    (gate.clone(), route.clone(), stop.clone(), books.clone());
                std::thread::spawn(move || {
                    let mut mine = Books::default();
                    let mut rng = seed as u64 * 7919 + 1;
                    while !stop.load(Ordering::Relaxed) {
                        let epoch = route.load(Ordering::Acquire);
                        if gate.claim(epoch, 3) != Claim::Granted {
                            std::hint::spin_loop();
                            continue;
                        }
                        *mine.granted.entry(epoch).or_default() += 1;
                        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
                        for _ in 0..(rng >> 58) {
                            std::hint::spin_loop();
                        }
                        match gate.release(epoch) {
                            Released::Counted { .. } => {
                                *mine.counted.entry(epoch).or_default() += 1
                            }
                            Released::Retired => *mine.told.entry(epoch).or_default() += 1,
                        }
                    }
                    let mut all = books.lock().unwrap();
                    for (epoch, n) in mine.granted {
                        *all.granted.entry(epoch).or_default() += n;
                    }
                    for (epoch, n) in mine.counted {
                        *all.counted.entry(epoch).or_default() += n;
                    }
                    for (epoch, n) in mine.told {
                        *all.told.entry(epoch).or_default() += n;
                    }
                })
            })
            .collect();
        let mut idle_stops = 0;
        for round in 0..20_000u32 {
            gate.open();
            for _ in 0..(round % 64) {
                std::hint::spin_loop();
            }
            let epoch = gate.epoch();
            let n = if round % 3 == 0 && gate.close_if_idle() {
                idle_stops += 1;
                let n = gate.retire();
                assert_eq!(n, 0, "a claim got past an idle stop");
                n
            } else {
                gate.close();
                gate.retire()
            };
            *books.lock().unwrap().taken.entry(epoch).or_default() += u64::from(n);
            route.store(gate.epoch(), Ordering::Release);
        }
        stop.store(true, Ordering::Relaxed);
        for c in claimers {
            c.join().unwrap();
        }
        let books = books.lock().unwrap();
        let total: u64 = books.granted.values().sum();
        assert!(total > 1_000, "the claimers got in: {total}");
        let get = |m: &HashMap<u32, u64>, e| m.get(&e).copied().unwrap_or(0);
        let mut epochs: Vec<u32> = books.granted.keys().copied().collect();
        epochs.extend(books.told.keys());
        for e in epochs {
            assert_eq!(
                get(&books.granted, e),
                get(&books.counted, e) + get(&books.told, e),
                "epoch {e}: every ticket released once"
            );
            assert_eq!(
                get(&books.told, e),
                get(&books.taken, e),
                "epoch {e}: the actor is told of exactly the tickets it took over"
            );
        }
        // The last epoch is current and never retired: its count is in the word.
        assert_eq!(gate.in_flight(), 0);
        eprintln!("{total} claims, {idle_stops} idle stops");
    }

    /// An actor that watches while claimers come and go must get one `Quiet` per watch that
    /// found requests in flight: never none (it would sleep through the end of the last
    /// request), never two.
    #[test]
    fn every_watch_set_is_answered_by_exactly_one_quiet() {
        let gate = Arc::new(Gate::new());
        gate.open();
        let epoch = gate.epoch();
        let stop = Arc::new(AtomicBool::new(false));
        let (quiet_tx, quiet_rx) = mpsc::channel::<()>();
        let claimers: Vec<_> = (0..2u32)
            .map(|seed| {
                let (gate, stop, quiet_tx) = (gate.clone(), stop.clone(), quiet_tx.clone());
                std::thread::spawn(move || {
                    let mut i = seed;
                    while !stop.load(Ordering::Relaxed) {
                        i = i.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                        assert_eq!(gate.claim(epoch, u32::MAX), Claim::Granted);
                        for _ in 0..(i >> 26) {
                            std::hint::spin_loop();
                        }
                        if gate.release(epoch) == (Released::Counted { quiet: true }) {
                            quiet_tx.send(()).unwrap();
                        }
                        // A pause between requests, so the count does fall to 0 now and then.
                        for _ in 0..((i >> 16) & 0x3ff) {
                            std::hint::spin_loop();
                        }
                    }
                })
            })
            .collect();
        drop(quiet_tx);
        let (mut watches, mut idle) = (0u32, 0u32);
        // Until 50 watches found requests in flight (a loaded machine may take a while).
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while watches < 50 && std::time::Instant::now() < until {
            if gate.watch() {
                watches += 1;
                quiet_rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the release that ended the last request sent Quiet");
            } else {
                idle += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for c in claimers {
            c.join().unwrap();
        }
        assert!(quiet_rx.try_recv().is_err(), "a Quiet nobody asked for");
        assert!(watches > 0, "the watch never caught a request in flight");
        assert_eq!(gate.in_flight(), 0);
        eprintln!("{watches} watches answered; {idle} found nothing in flight");
    }
}
