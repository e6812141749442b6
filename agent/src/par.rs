//! Work spread over the tablet's cores for the one big write, a snapshot install: hashing
//! 200,000 subject keys and sealing their rows is CPU work that does not need the store, so
//! it runs on every core while one thread writes what is ready in order.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};

/// Items per unit of work: small enough to spread, large enough that hand-offs are rare.
const BATCH: usize = 2048;

/// The number of worker threads: the cores available, at most 8.
fn workers(items: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    cores.min(8).min(items.div_ceil(BATCH)).max(1)
}

/// `f` of every item, in order, computed on all cores.
pub(crate) fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let mut out = Vec::with_capacity(items.len());
    let done: Result<(), std::convert::Infallible> = for_each_in_order(
        items.iter().collect(),
        |item| Ok(f(item)),
        |r| {
            out.push(r);
            Ok(())
        },
    );
    match done {
        Ok(()) => out,
        Err(never) => match never {},
    }
}

/// Computes `f` of every item on all cores and hands the results to `consume` on the calling
/// thread, in the items' order, as they become ready. The items are consumed (and so freed)
/// on the workers. The first error (from either) stops the work and is returned; workers
/// stop at their next batch.
pub(crate) fn for_each_in_order<T: Send, R: Send, E: Send>(
    items: Vec<T>,
    f: impl Fn(T) -> Result<R, E> + Sync,
    mut consume: impl FnMut(R) -> Result<(), E>,
) -> Result<(), E> {
    let n = workers(items.len());
    if n == 1 {
        for item in items {
            consume(f(item)?)?;
        }
        return Ok(());
    }
    let mut batches: Vec<Mutex<Option<Vec<T>>>> = Vec::with_capacity(items.len() / BATCH + 1);
    let mut items = items.into_iter();
    loop {
        let batch: Vec<T> = items.by_ref().take(BATCH).collect();
        if batch.is_empty() {
            break;
        }
        batches.push(Mutex::new(Some(batch)));
    }
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        // Bounded: workers run at most a few batches ahead of the writer.
        let (tx, rx) = mpsc::sync_channel::<(usize, Result<Vec<R>, E>)>(2 * n);
        for _ in 0..n {
            let tx = tx.clone();
            let (next, batches, f) = (&next, &batches, &f);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(slot) = batches.get(i) else {
                        return;
                    };
                    // Each batch is taken once (`next` hands out each index once).
                    let batch = match slot.lock() {
                        Ok(mut b) => b.take().unwrap_or_default(),
                        Err(poisoned) => poisoned.into_inner().take().unwrap_or_default(),
                    };
                    let out = batch.into_iter().map(f).collect::<Result<Vec<R>, E>>();
                    let failed = out.is_err();
                    if tx.send((i, out)).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(tx);
        // Batches finish out of order; hand them on in order.
        let mut ready: BTreeMap<usize, Vec<R>> = BTreeMap::new();
        let mut want = 0;
        for (i, out) in rx.iter() {
            ready.insert(i, out?);
            while let Some(batch) = ready.remove(&want) {
                for r in batch {
                    consume(r)?;
                }
                want += 1;
            }
        }
        // Every batch was sent unless a worker failed, and a failure returned above.
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_in_the_items_order() {
        let items: Vec<u64> = (0..(BATCH as u64 * 5 + 17)).collect();
        assert_eq!(
            map(&items, |x| x * 3),
            items.iter().map(|x| x * 3).collect::<Vec<_>>()
        );
        assert!(map(&[] as &[u64], |x| *x).is_empty());
    }

    #[test]
    fn the_first_error_stops_the_work_and_is_returned() {
        let items: Vec<u64> = (0..(BATCH as u64 * 6)).collect();
        let mut seen = 0u64;
        let r = for_each_in_order(
            items.clone(),
            |x| if x == 5000 { Err(x) } else { Ok(x) },
            |x| {
                assert_eq!(x, seen, "in order");
                seen += 1;
                Ok(())
            },
        );
        assert_eq!(r, Err(5000));
        assert!(seen <= 5000);
        // An error from the consumer stops it too.
        let r = for_each_in_order(
            items,
            Ok::<u64, u64>,
            |x| {
                if x == 10 { Err(x) } else { Ok(()) }
            },
        );
        assert_eq!(r, Err(10));
    }
}
