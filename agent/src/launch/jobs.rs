//! The launcher threads' queue: each job wakes one idle thread, and taking it wakes no other.
//!
//! A `Mutex<mpsc::Receiver>` shared by the threads did wake a second one per job: the
//! thread that took the job released the lock another thread was parked on, which woke to
//! park again on the channel, taking a CPU for nothing on a cold start's path (seen with
//! `perf sched` on 2 cores: the zygote and the spare want both of them at that moment).
//! Here idle threads wait on a condition variable, and `notify_one` wakes exactly one.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

pub type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub struct JobQueue {
    state: Mutex<State>,
    waiting: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl JobQueue {
    /// Queue `job` for a launcher thread; `Err` once the queue is closed.
    pub fn push(&self, job: Job) -> Result<(), Job> {
        let mut state = self.lock();
        if state.closed {
            return Err(job);
        }
        state.jobs.push_back(job);
        drop(state);
        self.waiting.notify_one();
        Ok(())
    }

    /// The next job, waiting for one; `None` once the queue is closed.
    pub fn pop(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self.waiting.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// No more jobs: queued ones still run, then every thread's `pop` returns `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.waiting.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn every_job_runs_once_and_threads_end_when_closed() {
        let queue = Arc::new(JobQueue::default());
        let ran = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let queue = queue.clone();
                std::thread::spawn(move || {
                    while let Some(job) = queue.pop() {
                        job();
                    }
                })
            })
            .collect();
        for _ in 0..100 {
            let ran = ran.clone();
            assert!(queue
                .push(Box::new(move || {
                    ran.fetch_add(1, Ordering::SeqCst);
                }))
                .is_ok());
        }
        queue.close();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ran.load(Ordering::SeqCst), 100);
        assert!(queue.push(Box::new(|| {})).is_err());
    }
}
