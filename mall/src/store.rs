//! What the mall asks of its database, whichever it is: place an order
//! (idempotent by ticket, one per user and sku), show a product page, load
//! a sale, read the books. Each request first waits for a pool connection
//! at most [`MallConfig::pool_wait`], as a real shop's pool does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

/// How the mall's database access behaves.
#[derive(Clone, Debug)]
pub struct MallConfig {
    /// Connections in the pool (a legacy shop's default is about 20).
    pub pool: usize,
    /// How long a request waits for a free connection before it is refused
    /// (HikariCP's `connectionTimeout`; zero refuses at once, like MySQL's
    /// "Too many connections").
    pub pool_wait: Duration,
    /// Work the shop does inside an order's transaction while it holds the
    /// stock-row lock (coupon checks, the payment record, its own logging).
    pub row_lock_hold: Duration,
}

impl Default for MallConfig {
    fn default() -> Self {
        Self {
            pool: 20,
            pool_wait: Duration::from_secs(1),
            row_lock_hold: Duration::from_millis(5),
        }
    }
}

/// An order row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    /// The order id (auto-increment).
    pub id: u64,
    /// What was bought.
    pub sku: String,
    /// Who bought it.
    pub user: String,
    /// Sluice's ticket, when the order came through the gateway.
    pub ticket: Option<String>,
}

/// What an order request came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderOutcome {
    /// A unit was taken and the order inserted.
    Placed(Order),
    /// The ticket was seen before: the first order, nothing new written.
    Replayed(Order),
    /// No stock left.
    SoldOut,
    /// This user already has an order for this sku.
    AlreadyBought,
    /// No such sku.
    NoSuchGoods,
}

/// A product page's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Goods {
    /// The sku.
    pub sku: String,
    /// Its display name.
    pub name: String,
    /// Its price in cents.
    pub price_cents: u64,
    /// Units left.
    pub stock: u64,
}

/// The books of one sku after (or during) a sale.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Books {
    /// The stock row's value.
    pub stock: u64,
    /// Every order of the sku, by id.
    pub orders: Vec<Order>,
}

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The pool stayed full for the whole wait.
    #[error("no database connection free within {wait:?} (pool of {pool})")]
    Busy {
        /// How long the request waited.
        wait: Duration,
        /// The pool's size.
        pool: usize,
    },
    /// The database failed or refused a statement.
    #[error("database: {0}")]
    Db(String),
}

/// The mall's storage: embedded or MySQL.
#[async_trait]
pub trait MallStore: Send + Sync {
    /// Places an order of one unit of `sku` for `user`; a `ticket` seen
    /// before answers with the order it made.
    async fn order(
        &self,
        sku: &str,
        user: &str,
        ticket: Option<&str>,
    ) -> Result<OrderOutcome, StoreError>;

    /// Reads a product page (a plain read: it does not wait on the row lock,
    /// only for a pool connection).
    async fn page(&self, sku: &str) -> Result<Option<Goods>, StoreError>;

    /// Starts a fresh sale: `sku` gets `stock` units and no orders.
    async fn reset(&self, sku: &str, stock: u64) -> Result<(), StoreError>;

    /// The stock row and the orders of `sku`.
    async fn books(&self, sku: &str) -> Result<Books, StoreError>;

    /// Pool connections held by requests right now.
    fn pool_in_use(&self) -> usize;

    /// The pool's size.
    fn pool_size(&self) -> usize;

    /// One line saying what the store is, for logs and reports.
    fn describe(&self) -> String;
}

/// Counts the pool connections held by requests.
#[derive(Clone, Debug, Default)]
pub(crate) struct InUse(Arc<AtomicUsize>);

impl InUse {
    /// Counts one connection until the guard drops.
    pub(crate) fn hold(&self) -> InUseGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        InUseGuard(self.0.clone())
    }

    /// Connections held now.
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One held connection, counted until dropped.
pub(crate) struct InUseGuard(Arc<AtomicUsize>);

impl Drop for InUseGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
