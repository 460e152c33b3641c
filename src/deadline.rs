//! Deadlines that almost never fire, kept cheaply. Every request carries two: hyper's `header_read_timeout`
//! (until the caller's next request head) and `upstream.response_timeout` (until upstream's response head); a
//! write to a caller that waits takes a third, `server.send_timeout` ([`crate::send_timeout`]).
//! On tokio's timer each cost ~1.5k instructions per request (callgrind: an entry registered in the timer
//! wheel under the driver's lock, then removed again, for a timer that fires for almost no request).
//!
//! Here a deadline is a slot in its traffic thread's table, taken on its first poll and given back when it is
//! dropped, and the thread's ticker (a task [`Deadlines::start`] spawns) looks the table over once per tick and
//! wakes each deadline that has passed. A deadline so fires up to one tick late. The tick is a 64th of the shortest
//! timeout the table serves (between 1 ms and 1 s: 1 s for the default timeouts of 75 s and 300 s), so the
//! lateness is a small share of any timeout; the ticker sleeps while the table is empty.
//!
//! Deadlines are in real time (`std::time::Instant`): a tokio runtime with paused time (`start_paused` tests)
//! does not move them.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The ticks' bounds.
const MIN_TICK: Duration = Duration::from_millis(1);
const MAX_TICK: Duration = Duration::from_secs(1);

/// One traffic thread's deadlines; clones share the table, and the ticker [`Deadlines::start`] spawned.
#[derive(Clone)]
pub struct Deadlines {
    table: Arc<Mutex<Table>>,
    tick: Duration,
}

impl fmt::Debug for Deadlines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deadlines").field("tick", &self.tick).field("live", &self.lock().live).finish()
    }
}

#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    /// Indexes of the slots no deadline holds.
    free: Vec<usize>,
    /// How many slots deadlines hold.
    live: usize,
    /// The ticker, while it waits for the table to have a deadline.
    ticker: Option<Waker>,
}

impl Drop for Table {
    fn drop(&mut self) {
        // A ticker waiting for a first deadline looks again, finds the table gone, and ends.
        if let Some(ticker) = self.ticker.take() {
            ticker.wake();
        }
    }
}

struct Slot {
    at: Instant,
    state: State,
}

enum State {
    Free,
    /// Not yet passed: who to wake when it does.
    Waiting(Waker),
    Passed,
}

impl Deadlines {
    /// A table whose tick suits timeouts of `shortest` and longer, with its ticker running on the current tokio
    /// runtime (outside one this panics, as `tokio::spawn` does). The ticker ends once the table's last handle
    /// and last deadline are gone.
    pub fn start(shortest: Duration) -> Self {
        let deadlines = Self::with_tick_for(shortest);
        tokio::spawn(tick(Arc::downgrade(&deadlines.table), deadlines.tick));
        deadlines
    }

    fn with_tick_for(shortest: Duration) -> Self {
        Self { table: Arc::default(), tick: (shortest / 64).clamp(MIN_TICK, MAX_TICK) }
    }

    /// A deadline `after` from now; thirty years on for a duration too large to add (a configured "never").
    pub fn after(&self, after: Duration) -> Deadline {
        let now = Instant::now();
        self.at(now.checked_add(after).unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400)))
    }

    /// A deadline at `at`.
    pub fn at(&self, at: Instant) -> Deadline {
        Deadline { table: self.table.clone(), at, slot: None }
    }

    /// `future`, unless it takes longer than `after`. (A large future is best passed pinned, `pin!(...)`: it
    /// is moved in, and moved again when awaited.)
    pub fn timeout<F: Future>(&self, after: Duration, future: F) -> Timeout<F> {
        Timeout { future, deadline: self.after(after) }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }
}

/// The ticker: wakes each deadline of `table` as it passes, until the table is gone.
async fn tick(table: Weak<Mutex<Table>>, tick: Duration) {
    let mut passed = Vec::new();
    loop {
        // Nothing to watch: wait for a first deadline (or for the table to go).
        let watching = poll_fn(|cx| {
            let Some(table) = table.upgrade() else { return Poll::Ready(false) };
            let mut table = lock(&table);
            if table.live > 0 {
                return Poll::Ready(true);
            }
            table.ticker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if !watching {
            return;
        }
        tokio::time::sleep(tick).await;
        let Some(table) = table.upgrade() else { return };
        let now = Instant::now();
        let mut slots = lock(&table);
        for slot in slots.slots.iter_mut().filter(|slot| slot.at <= now) {
            if let State::Waiting(_) = slot.state
                && let State::Waiting(waker) = std::mem::replace(&mut slot.state, State::Passed)
            {
                passed.push(waker);
            }
        }
        drop(slots);
        drop(table);
        // Woken outside the lock: a waker may poll its deadline at once.
        passed.drain(..).for_each(Waker::wake);
    }
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A point in time that, polled, resolves once it has passed (up to a tick late).
pub struct Deadline {
    table: Arc<Mutex<Table>>,
    at: Instant,
    /// The table slot it holds, from its first poll.
    slot: Option<usize>,
}

impl Deadline {
    /// Moves the deadline to `at` (it may then resolve again).
    pub fn reset(&mut self, at: Instant) {
        self.at = at;
        if let Some(i) = self.slot {
            let mut table = lock(&self.table);
            let slot = &mut table.slots[i];
            slot.at = at;
            if let State::Passed = slot.state {
                // Waits again; the waker comes with the next poll.
                slot.state = State::Waiting(Waker::noop().clone());
            }
        }
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut table = lock(&this.table);
        let Some(i) = this.slot else {
            let slot = Slot { at: this.at, state: State::Waiting(cx.waker().clone()) };
            this.slot = Some(match table.free.pop() {
                Some(i) => {
                    table.slots[i] = slot;
                    i
                }
                None => {
                    table.slots.push(slot);
                    table.slots.len() - 1
                }
            });
            table.live += 1;
            if let Some(ticker) = table.ticker.take() {
                drop(table);
                ticker.wake();
            }
            return Poll::Pending;
        };
        match &mut table.slots[i].state {
            State::Passed => Poll::Ready(()),
            State::Waiting(waker) => {
                if !waker.will_wake(cx.waker()) {
                    *waker = cx.waker().clone();
                }
                Poll::Pending
            }
            State::Free => unreachable!("a deadline's slot is freed only when the deadline is dropped"),
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let mut table = lock(&self.table);
            table.slots[i].state = State::Free;
            table.free.push(i);
            table.live -= 1;
        }
    }
}

impl hyper::rt::Sleep for Deadline {}

/// hyper's timer on a thread's deadlines: hyper asks for one per request head, for `header_read_timeout`.
#[derive(Clone, Debug)]
pub struct HyperTimer(pub Deadlines);

impl hyper::rt::Timer for HyperTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.0.after(duration))
    }

    fn sleep_until(&self, at: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.0.at(at))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, at: Instant) {
        match sleep.as_mut().downcast_mut_pin::<Deadline>() {
            Some(deadline) => deadline.get_mut().reset(at),
            None => *sleep = self.sleep_until(at),
        }
    }
}

pin_project_lite::pin_project! {
    /// A future that gives up at a deadline ([`Deadlines::timeout`]).
    pub struct Timeout<F> {
        #[pin]
        future: F,
        deadline: Deadline,
    }
}

/// A [`Timeout`]'s deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        Pin::new(this.deadline).poll(cx).map(|()| Err(Elapsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table with a 1 ms tick and its ticker running on the test's runtime.
    fn running() -> Deadlines {
        let deadlines = Deadlines::start(Duration::from_millis(64));
        assert_eq!(deadlines.tick, MIN_TICK);
        deadlines
    }

    #[test]
    fn the_tick_is_a_64th_of_the_shortest_timeout_within_bounds() {
        assert_eq!(Deadlines::with_tick_for(Duration::from_secs(75)).tick, MAX_TICK);
        assert_eq!(Deadlines::with_tick_for(Duration::from_millis(640)).tick, Duration::from_millis(10));
        assert_eq!(Deadlines::with_tick_for(Duration::ZERO).tick, MIN_TICK);
    }

    #[tokio::test]
    async fn a_deadline_fires_once_it_has_passed_and_not_before() {
        let deadlines = running();
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), deadlines.after(Duration::from_millis(30))).await.expect("fired");
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(30), "fired after {waited:?}");
        assert!(waited < Duration::from_secs(5), "fired after {waited:?}");
        assert_eq!(deadlines.lock().live, 0, "its slot is given back");
    }

    #[tokio::test]
    async fn the_ticker_ends_with_its_table() {
        let tasks = tokio::runtime::Handle::current().metrics();
        let deadlines = running();
        deadlines.after(Duration::from_millis(5)).await;
        assert_eq!(tasks.num_alive_tasks(), 1, "the ticker");
        // Once it has seen the table empty, it waits for a first deadline.
        let parked = async {
            while deadlines.lock().ticker.is_none() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), parked).await.expect("the ticker waits");
        drop(deadlines);
        let ended = async {
            while tasks.num_alive_tasks() > 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), ended).await.expect("the ticker ended");
    }

    #[tokio::test]
    async fn a_duration_too_large_to_add_is_never() {
        let deadlines = running();
        let mut never = deadlines.after(Duration::MAX);
        assert!(Pin::new(&mut never).poll(&mut Context::from_waker(Waker::noop())).is_pending());
    }

    #[tokio::test]
    async fn a_timeout_gives_the_output_or_elapsed() {
        let deadlines = running();
        assert_eq!(deadlines.timeout(Duration::from_secs(60), async { 7 }).await, Ok(7));
        // Bounded by tokio's own timer, so that a deadline that never fires fails the test rather than hangs it.
        let elapsed = || async {
            let never = std::future::pending::<()>();
            tokio::time::timeout(Duration::from_secs(10), deadlines.timeout(Duration::from_millis(10), never)).await
        };
        assert_eq!(elapsed().await, Ok(Err(Elapsed)));
        // The same after the ticker slept on an empty table: a new deadline wakes it.
        assert_eq!(elapsed().await, Ok(Err(Elapsed)));
    }

    #[tokio::test]
    async fn dropped_deadlines_give_their_slots_back_and_never_fire() {
        let deadlines = running();
        let waker = Waker::noop();
        let mut held: Vec<Deadline> = (0..3).map(|_| deadlines.after(Duration::from_millis(5))).collect();
        for deadline in &mut held {
            assert!(Pin::new(deadline).poll(&mut Context::from_waker(waker)).is_pending());
        }
        assert_eq!(deadlines.lock().live, 3);
        held.remove(1);
        assert_eq!(deadlines.lock().live, 2);
        // The freed slot is the next one taken.
        let mut next = deadlines.after(Duration::from_secs(60));
        assert!(Pin::new(&mut next).poll(&mut Context::from_waker(waker)).is_pending());
        assert_eq!((next.slot, deadlines.lock().slots.len()), (Some(1), 3));
        drop(held);
        drop(next);
        assert_eq!(deadlines.lock().live, 0);
    }

    #[tokio::test]
    async fn a_reset_deadline_fires_at_its_new_time() {
        let deadlines = running();
        let mut deadline = deadlines.after(Duration::from_secs(3600));
        assert!(Pin::new(&mut deadline).poll(&mut Context::from_waker(Waker::noop())).is_pending());
        let start = Instant::now();
        deadline.reset(start + Duration::from_millis(20));
        tokio::time::timeout(Duration::from_secs(10), &mut deadline).await.expect("fired at its new time");
        assert!(start.elapsed() >= Duration::from_millis(20));
        // Passed, then moved on: it waits again.
        deadline.reset(Instant::now() + Duration::from_secs(3600));
        assert!(Pin::new(&mut deadline).poll(&mut Context::from_waker(Waker::noop())).is_pending());
    }
}
