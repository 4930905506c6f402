//! Deadlines for the collector's loop, each on its own timerfd.
//!
//! In: a due time ([`Alarm::set`]). Out: one wake-up at that time ([`Alarm::fired`]),
//! which says when it was due.
//!
//! Why not `tokio::time::sleep`: tokio's timer wheel files a deadline more than 64 ms away
//! in a coarser level, and its driver wakes once to move it down a level and again when it
//! is due. An idle collector's reads (every 100 ms by default) and its one-second tick thus
//! cost two wake-ups each, half of an idle collector's wake-ups. A timerfd wakes the thread
//! once, when due. It costs two syscalls per read (reading its count, setting it again):
//! under traffic, 200 reads a second, the collector used no more CPU for them than on
//! tokio's timer.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// One deadline at a time; setting another replaces it.
pub struct Alarm {
    timer: AsyncFd<Timer>,
    due: Option<Instant>,
}

/// A timerfd as tokio registers it (it asks for `AsRawFd`, which nix's `TimerFd` lacks).
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Alarm {
    /// An alarm on `CLOCK_MONOTONIC` (the clock of tokio's `Instant`), set to go off at
    /// `due`. Must be called inside a tokio runtime.
    pub fn at(due: Instant) -> io::Result<Self> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // SAFETY: `Timer` owns the timerfd and keeps it open, unchanged, for as long as
        // the `AsyncFd` owns the `Timer`.
        let timer =
            unsafe { AsyncFd::register_with_interest(Timer(fd), tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
        let mut alarm = Alarm { timer, due: None };
        alarm.set(due)?;
        Ok(alarm)
    }

    /// Goes off at `due` (at once if that has passed), instead of when it was set to.
    pub fn set(&mut self, due: Instant) -> io::Result<()> {
        let wait = until(due, Instant::now());
        let expiration = Expiration::OneShot(wait.into());
        self.timer
            .get_ref()
            .0
            .set(expiration, TimerSetTimeFlags::empty())?;
        self.due = Some(due);
        Ok(())
    }

    /// When it goes off next; `None` once it went off, until it is set again.
    #[cfg(test)]
    fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Waits until it goes off and returns when it was due. Pending for ever while unset.
    /// Cancel-safe: nothing is consumed until it has gone off.
    pub async fn fired(&mut self) -> io::Result<Instant> {
        loop {
            let mut guard = self.timer.readable_mut().await?;
            // `EAGAIN` (not yet due: a stale readiness, or set again since) clears the
            // readiness and waits on.
            match guard.try_io(|t| t.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(Ok(())) => {
                    // The count is read, so the timerfd is not readable until it goes off
                    // again (a new edge): clearing now saves the next wait a read that
                    // would only find `EAGAIN`.
                    guard.clear_ready();
                    if let Some(due) = self.due.take() {
                        return Ok(due);
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }
}

/// How long from `now` until `due`, at least a nanosecond: a zero one-shot expiration
/// would disarm the timerfd rather than fire it.
fn until(due: Instant, now: Instant) -> Duration {
    due.saturating_duration_since(now)
        .max(Duration::from_nanos(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_never_zero_which_would_disarm_the_timer() {
        let now = Instant::now();
        assert_eq!(
            until(now, now + Duration::from_secs(1)),
            Duration::from_nanos(1)
        );
        assert_eq!(
            until(now + Duration::from_millis(7), now),
            Duration::from_millis(7)
        );
    }

    #[tokio::test]
    async fn it_fires_once_when_due_and_says_when_it_was_due() {
        let due = Instant::now() + Duration::from_millis(30);
        let mut alarm = Alarm::at(due).expect("timerfd");
        let fired = alarm.fired().await.expect("fired");
        assert_eq!(fired, due);
        assert!(Instant::now() >= due, "fired before it was due");
        assert_eq!(alarm.due(), None);
        // Unset now: it stays quiet.
        let again = tokio::time::timeout(Duration::from_millis(50), alarm.fired()).await;
        assert!(again.is_err(), "an alarm that went off fired again");
    }

    #[tokio::test]
    async fn setting_it_again_replaces_the_deadline() {
        let mut alarm = Alarm::at(Instant::now() + Duration::from_secs(60)).expect("timerfd");
        let sooner = Instant::now() + Duration::from_millis(10);
        alarm.set(sooner).expect("set");
        let fired = tokio::time::timeout(Duration::from_secs(5), alarm.fired())
            .await
            .expect("the replaced deadline still held")
            .expect("fired");
        assert_eq!(fired, sooner);
    }

    #[tokio::test]
    async fn a_deadline_set_after_one_went_off_unread_waits_for_its_time() {
        let mut alarm = Alarm::at(Instant::now()).expect("timerfd");
        // Gone off (the timerfd is readable), but set again before anyone waited.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let later = Instant::now() + Duration::from_millis(200);
        alarm.set(later).expect("set");
        let early = tokio::time::timeout(Duration::from_millis(100), alarm.fired()).await;
        assert!(
            early.is_err(),
            "the expiration before the new deadline fired it"
        );
        assert_eq!(alarm.fired().await.expect("fired"), later);
    }

    #[tokio::test]
    async fn a_past_due_time_fires_at_once() {
        let past = Instant::now() - Duration::from_millis(5);
        let mut alarm = Alarm::at(past).expect("timerfd");
        let fired = tokio::time::timeout(Duration::from_secs(1), alarm.fired())
            .await
            .expect("a past due time did not fire")
            .expect("fired");
        assert_eq!(fired, past);
    }
}
