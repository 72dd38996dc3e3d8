//! The embedded store: the mall's database without a database, so the demo
//! needs nothing installed. A semaphore of [`MallConfig::pool`] permits is
//! the connection pool (a request waits at most `pool_wait` for one); each
//! sku's stock row has a tokio mutex that an order holds for its whole
//! transaction, as InnoDB's row lock does after `SELECT ... FOR UPDATE`;
//! the orders ledger keeps the ticket and (user, sku) unique like the
//! MySQL schema's unique keys. Pages read the stock without the row lock,
//! like a non-locking consistent read.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::{OwnedMutexGuard, Semaphore, SemaphorePermit};

use crate::store::{
    Books, Goods, InUse, InUseGuard, MallConfig, MallStore, Order, OrderOutcome, StoreError,
};

/// A stock row: its lock and its value.
struct Row {
    /// Held by an order for its whole transaction.
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Units left; written only under `lock`, read without it by pages.
    stock: AtomicU64,
}

/// The orders table.
#[derive(Default)]
struct Ledger {
    /// The last order id handed out.
    last_id: u64,
    /// Every order, by id.
    orders: Vec<Order>,
    /// ticket -> index in `orders` (the UNIQUE(ticket) key).
    by_ticket: HashMap<String, usize>,
    /// (user, sku) pairs with an order (the UNIQUE(user, sku) key).
    by_user: HashSet<(String, String)>,
}

/// The embedded store.
pub struct EmbeddedStore {
    /// Pool size, wait and row-lock hold.
    config: MallConfig,
    /// The connection pool.
    pool: Semaphore,
    /// Connections held now.
    in_use: InUse,
    /// sku -> its stock row.
    rows: Mutex<HashMap<String, Arc<Row>>>,
    /// The orders table.
    ledger: Mutex<Ledger>,
}

/// A pool connection: the permit and its count.
struct Conn<'a> {
    _permit: SemaphorePermit<'a>,
    _counted: InUseGuard,
}

impl EmbeddedStore {
    /// An empty store; load a sale with [`MallStore::reset`].
    pub fn new(config: MallConfig) -> Self {
        Self {
            pool: Semaphore::new(config.pool),
            config,
            in_use: InUse::default(),
            rows: Mutex::new(HashMap::new()),
            ledger: Mutex::new(Ledger::default()),
        }
    }

    /// Takes `sku`'s row lock as a stuck transaction would, until the
    /// guard drops (for tests that need the lock held however slow the
    /// machine is). `None` when the sku does not exist.
    pub async fn hold_row(&self, sku: &str) -> Option<OwnedMutexGuard<()>> {
        let row = self.row(sku)?;
        Some(row.lock.clone().lock_owned().await)
    }

    /// Waits up to `pool_wait` for a connection.
    async fn connection(&self) -> Result<Conn<'_>, StoreError> {
        // `timeout` polls the acquire once before looking at the clock, so a
        // zero wait still takes a free permit.
        match tokio::time::timeout(self.config.pool_wait, self.pool.acquire()).await {
            Ok(Ok(permit)) => Ok(Conn {
                _permit: permit,
                _counted: self.in_use.hold(),
            }),
            Ok(Err(_)) => Err(StoreError::Db("the pool is closed".into())),
            Err(_) => Err(StoreError::Busy {
                wait: self.config.pool_wait,
                pool: self.config.pool,
            }),
        }
    }

    fn row(&self, sku: &str) -> Option<Arc<Row>> {
        lock(&self.rows).get(sku).cloned()
    }
}

/// A std mutex's guard; a poisoned lock still holds consistent data here
/// (every critical section is a few plain writes).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl MallStore for EmbeddedStore {
    async fn order(
        &self,
        sku: &str,
        user: &str,
        ticket: Option<&str>,
    ) -> Result<OrderOutcome, StoreError> {
        let _conn = self.connection().await?;
        let Some(row) = self.row(sku) else {
            return Ok(OrderOutcome::NoSuchGoods);
        };
        // SELECT stock FROM goods WHERE sku = ? FOR UPDATE
        let _row_lock = row.lock.lock().await;
        tokio::time::sleep(self.config.row_lock_hold).await;
        let mut ledger = lock(&self.ledger);
        if let Some(&i) = ticket.and_then(|t| ledger.by_ticket.get(t)) {
            return Ok(OrderOutcome::Replayed(ledger.orders[i].clone()));
        }
        // UPDATE goods SET stock = stock - 1 WHERE sku = ? AND stock > 0
        let left = row.stock.load(Ordering::Acquire);
        if left == 0 {
            return Ok(OrderOutcome::SoldOut);
        }
        // INSERT INTO orders ...: a duplicate (user, sku) rolls the update back.
        if !ledger.by_user.insert((user.to_string(), sku.to_string())) {
            return Ok(OrderOutcome::AlreadyBought);
        }
        row.stock.store(left - 1, Ordering::Release);
        ledger.last_id += 1;
        let order = Order {
            id: ledger.last_id,
            sku: sku.to_string(),
            user: user.to_string(),
            ticket: ticket.map(str::to_string),
        };
        if let Some(t) = ticket {
            let i = ledger.orders.len();
            ledger.by_ticket.insert(t.to_string(), i);
        }
        ledger.orders.push(order.clone());
        Ok(OrderOutcome::Placed(order))
    }

    async fn page(&self, sku: &str) -> Result<Option<Goods>, StoreError> {
        let _conn = self.connection().await?;
        Ok(self.row(sku).map(|row| Goods {
            sku: sku.to_string(),
            name: format!("{sku} (flash sale)"),
            price_cents: 99_900,
            stock: row.stock.load(Ordering::Acquire),
        }))
    }

    async fn reset(&self, sku: &str, stock: u64) -> Result<(), StoreError> {
        let row = Arc::new(Row {
            lock: Arc::new(tokio::sync::Mutex::new(())),
            stock: AtomicU64::new(stock),
        });
        lock(&self.rows).insert(sku.to_string(), row);
        let mut ledger = lock(&self.ledger);
        let Ledger {
            orders,
            by_ticket,
            by_user,
            ..
        } = &mut *ledger;
        orders.retain(|o| o.sku != sku);
        by_user.retain(|(_, s)| s != sku);
        by_ticket.clear();
        for (i, o) in orders.iter().enumerate() {
            if let Some(t) = &o.ticket {
                by_ticket.insert(t.clone(), i);
            }
        }
        Ok(())
    }

    async fn books(&self, sku: &str) -> Result<Books, StoreError> {
        let stock = self
            .row(sku)
            .map(|r| r.stock.load(Ordering::Acquire))
            .unwrap_or(0);
        let orders = lock(&self.ledger)
            .orders
            .iter()
            .filter(|o| o.sku == sku)
            .cloned()
            .collect();
        Ok(Books { stock, orders })
    }

    fn pool_in_use(&self) -> usize {
        self.in_use.get()
    }

    fn pool_size(&self) -> usize {
        self.config.pool
    }

    fn describe(&self) -> String {
        format!(
            "embedded store, pool of {} (wait {:?}), row lock held {:?} per order",
            self.config.pool, self.config.pool_wait, self.config.row_lock_hold
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn store(pool: usize) -> EmbeddedStore {
        EmbeddedStore::new(MallConfig {
            pool,
            pool_wait: Duration::ZERO,
            row_lock_hold: Duration::ZERO,
        })
    }

    #[tokio::test]
    async fn sells_the_stock_once_per_user_and_replays_a_ticket() {
        let s = store(2);
        s.reset("p", 2).await.expect("reset");
        let first = s.order("p", "u1", Some("t1")).await.expect("order");
        let OrderOutcome::Placed(order) = first else {
            panic!("{first:?}")
        };
        assert_eq!(
            s.order("p", "u1", Some("t1")).await.expect("again"),
            OrderOutcome::Replayed(order.clone())
        );
        assert_eq!(
            s.order("p", "u1", Some("t2")).await.expect("other ticket"),
            OrderOutcome::AlreadyBought
        );
        assert!(matches!(
            s.order("p", "u2", None).await,
            Ok(OrderOutcome::Placed(_))
        ));
        assert_eq!(
            s.order("p", "u3", None).await.expect("third"),
            OrderOutcome::SoldOut
        );
        assert_eq!(
            s.order("q", "u3", None).await.expect("unknown"),
            OrderOutcome::NoSuchGoods
        );
        let books = s.books("p").await.expect("books");
        assert_eq!(books.stock, 0);
        assert_eq!(books.orders.len(), 2);
        s.reset("p", 5).await.expect("reset again");
        assert_eq!(s.books("p").await.expect("books").orders, vec![]);
        assert!(matches!(
            s.order("p", "u1", Some("t1")).await,
            Ok(OrderOutcome::Placed(_))
        ));
    }

    #[tokio::test]
    async fn a_full_pool_refuses_pages_while_orders_wait_on_the_row() {
        let s = Arc::new(store(1));
        s.reset("p", 1).await.expect("reset");
        let held = s.hold_row("p").await.expect("row");
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { s.order("p", "u1", None).await }
        });
        // The order takes the only connection and waits on the row.
        while s.pool_in_use() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(s.page("p").await, Err(StoreError::Busy { .. })));
        drop(held);
        assert!(matches!(
            waiting.await.expect("join"),
            Ok(OrderOutcome::Placed(_))
        ));
        assert_eq!(s.page("p").await.expect("page").map(|g| g.stock), Some(0));
        assert_eq!(s.pool_in_use(), 0);
    }
}
