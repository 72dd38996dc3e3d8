//! I/O under a deadline that costs nothing when it need not wait: most
//! reads and writes of a loaded server are ready when first polled. Used by
//! the connection gate (`server::connections`) and the relay
//! (`proxy::relay`).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use tokio::time::error::Elapsed;
use tokio::time::{timeout_at, Instant};

/// `timeout_at(by(), fut)`, reading the clock and arming a timer only when
/// `fut` cannot finish at once: under load most reads and writes are ready
/// when first polled, and a clock read is a system call on some virtual
/// machines (this one: `read_tsc` in the kernel profile). The first poll's
/// waker is a no-op; the next poll, under the timer, registers the real one.
/// The timer is boxed: it lives only while a read or write waits, not in
/// every idle connection's future.
pub async fn within<F: Future>(fut: F, by: impl FnOnce() -> Instant) -> Result<F::Output, Elapsed> {
    let mut fut = pin!(fut);
    if let Poll::Ready(out) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        return Ok(out);
    }
    Box::pin(timeout_at(by(), fut)).await
}

#[cfg(test)]
mod tests {
    use super::within;

    #[tokio::test]
    async fn within_reads_the_clock_only_for_a_future_that_waits() {
        let ready = within(async { 7 }, || panic!("a ready future needs no deadline")).await;
        assert_eq!(ready.ok(), Some(7));
        let by = tokio::time::Instant::now() + std::time::Duration::from_millis(20);
        let waited = within(std::future::pending::<()>(), || by).await;
        assert!(waited.is_err(), "a pending future ends at its deadline");
        assert!(tokio::time::Instant::now() >= by);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            let _ = tx.send(3);
        });
        // Pending at the first (no-op waker) poll, woken through the timer's poll.
        let late = within(rx, || by + std::time::Duration::from_secs(5)).await;
        assert_eq!(late.ok().and_then(Result::ok), Some(3));
    }
}
