//! Output of one process, fanned out to any number of streams.
//!
//! The hub keeps recent output so that a `Connect` arriving later still sees it, and applies
//! back-pressure: while a stream is attached, the reader stops taking output from the process
//! once that stream lags by more than [`RETAIN`] bytes, so an attached client never loses
//! data (the process blocks on a full pipe instead, as it would writing to a slow terminal).
//! With nobody attached the oldest output is dropped instead, so an unattended background
//! process never blocks.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;

/// Output kept per process for late `Connect`s, and the most an attached stream may lag.
pub const RETAIN: u64 = 1 << 20;

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// The terminal (PTY processes have one merged stream).
    Pty,
}

/// How the process ended, as reported in the `end` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    /// Exit code (-1 when a signal ended it).
    pub exit_code: i32,
    /// Whether it exited on its own.
    pub exited: bool,
    /// Human-readable status, e.g. `exit status 0` or `signal: killed`.
    pub status: String,
    /// An error that prevented a normal end, if any.
    pub error: Option<String>,
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A chunk of output.
    Data(Source, Bytes),
    /// The process ended; nothing follows.
    End(End),
}

#[derive(Debug)]
struct Chunk {
    start: u64,
    source: Source,
    data: Bytes,
}

#[derive(Debug, Default)]
struct State {
    chunks: VecDeque<Chunk>,
    /// Offset of the first retained byte.
    head: u64,
    /// Total bytes produced.
    tail: u64,
    end: Option<End>,
    /// Whether some subscriber has received the end (so someone saw the whole run).
    end_delivered: bool,
    /// Subscriber id -> offset up to which it has consumed.
    cursors: HashMap<u64, u64>,
    next_id: u64,
}

impl State {
    fn trim(&mut self) {
        let min_cursor = self.cursors.values().copied().min().unwrap_or(self.tail);
        while self.tail - self.head > RETAIN {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let front_end = front.start + front.data.len() as u64;
            if front_end > min_cursor {
                break;
            }
            self.chunks.pop_front();
            self.head = self.chunks.front().map_or(self.tail, |c| c.start);
        }
    }

    fn lagging(&self) -> bool {
        self.cursors.values().any(|c| self.tail - c > RETAIN)
    }
}

/// Output of one process.
#[derive(Debug)]
pub struct Hub {
    state: Mutex<State>,
    /// Bumped on every change; producer and subscribers wait on it.
    changed: watch::Sender<u64>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(0),
        }
    }
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Waits until no attached subscriber lags too far behind, so that the next chunk can be
    /// taken from the process.
    pub async fn wait_for_room(&self) {
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if !self.lock().lagging() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Appends output.
    pub fn push(&self, source: Source, data: Bytes) {
        if data.is_empty() {
            return;
        }
        {
            let mut st = self.lock();
            if st.end.is_some() {
                return;
            }
            let start = st.tail;
            st.tail += data.len() as u64;
            st.chunks.push_back(Chunk {
                start,
                source,
                data,
            });
            st.trim();
        }
        self.notify();
    }

    /// Records the end; subscribers receive it after the remaining output.
    pub fn finish(&self, end: End) {
        self.lock().end.get_or_insert(end);
        self.notify();
    }

    /// Whether the process has ended.
    pub fn ended(&self) -> bool {
        self.lock().end.is_some()
    }

    /// Waits until a subscriber has received the end, or `timeout` passes.
    pub async fn wait_end_delivered(&self, timeout: std::time::Duration) {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if self.lock().end_delivered {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }

    /// Attaches a subscriber that starts at the oldest retained output.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        let head = st.head;
        st.cursors.insert(id, head);
        drop(st);
        Subscription {
            hub: self.clone(),
            id,
            rx: self.changed.subscribe(),
        }
    }
}

/// One reader of a [`Hub`]; detaches when dropped (e.g. when the client goes away).
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    rx: watch::Receiver<u64>,
}

impl Subscription {
    /// The next item without waiting, if there is one.
    fn try_next(&self) -> Option<Item> {
        let mut st = self.hub.lock();
        let cursor = st.cursors.get(&self.id).copied()?;
        let cursor = cursor.max(st.head);
        if let Some(chunk) = st
            .chunks
            .iter()
            .find(|c| c.start + c.data.len() as u64 > cursor)
        {
            let skip = (cursor - chunk.start) as usize;
            let item = Item::Data(chunk.source, chunk.data.slice(skip..));
            let new_cursor = chunk.start + chunk.data.len() as u64;
            st.cursors.insert(self.id, new_cursor);
            st.trim();
            drop(st);
            // The producer may be waiting for this subscriber to catch up.
            self.hub.notify();
            return Some(item);
        }
        let end = st.end.clone()?;
        st.cursors.remove(&self.id);
        st.end_delivered = true;
        drop(st);
        self.hub.notify();
        Some(Item::End(end))
    }

    /// The next item; `None` after the end has been delivered.
    pub async fn next(&mut self) -> Option<Item> {
        loop {
            self.rx.borrow_and_update();
            if !self.hub.lock().cursors.contains_key(&self.id) {
                return None;
            }
            if let Some(item) = self.try_next() {
                return Some(item);
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let removed = self.hub.lock().cursors.remove(&self.id).is_some();
        if removed {
            self.hub.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn late_subscriber_sees_retained_output_then_end() {
        let hub = Arc::new(Hub::default());
        hub.push(Source::Stdout, Bytes::from_static(b"a"));
        hub.push(Source::Stderr, Bytes::from_static(b"b"));
        hub.finish(End {
            exit_code: 0,
            exited: true,
            status: "exit status 0".into(),
            error: None,
        });
        let mut sub = hub.subscribe();
        assert_eq!(
            sub.next().await,
            Some(Item::Data(Source::Stdout, Bytes::from_static(b"a")))
        );
        assert_eq!(
            sub.next().await,
            Some(Item::Data(Source::Stderr, Bytes::from_static(b"b")))
        );
        assert!(matches!(sub.next().await, Some(Item::End(_))));
        assert_eq!(sub.next().await, None);
    }

    #[tokio::test]
    async fn unattended_output_is_bounded() {
        let hub = Arc::new(Hub::default());
        for _ in 0..100 {
            hub.push(Source::Stdout, Bytes::from(vec![0u8; 64 * 1024]));
        }
        let st = hub.lock();
        assert!(st.tail - st.head <= RETAIN + 64 * 1024);
        assert_eq!(st.tail, 100 * 64 * 1024);
    }

    #[tokio::test]
    async fn attached_subscriber_applies_back_pressure() {
        let hub = Arc::new(Hub::default());
        let mut sub = hub.subscribe();
        for _ in 0..20 {
            hub.push(Source::Stdout, Bytes::from(vec![1u8; 64 * 1024]));
        }
        // Lagging by 1.25 MiB: the producer must wait...
        let waiter = tokio::spawn({
            let hub = hub.clone();
            async move { hub.wait_for_room().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        // ...and nothing the subscriber has not read may be dropped.
        let mut got = 0;
        while got < 20 * 64 * 1024 {
            match sub.next().await {
                Some(Item::Data(_, d)) => got += d.len(),
                other => panic!("unexpected {other:?}"),
            }
        }
        waiter.await.unwrap();
    }
}
