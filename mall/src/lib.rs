//! A stand-in for the legacy mall Sluice protects: a PHP or Java shop on
//! MySQL with a small connection pool. Every order takes a pool connection,
//! locks its sku's stock row (`SELECT ... FOR UPDATE`), does a few
//! milliseconds of work inside the transaction, decrements the stock only
//! if some is left and inserts the order under unique keys (the ticket, and
//! the user per sku); product pages need a pool connection too. When the
//! pool is full, a request waits a bounded time for a connection and is
//! then refused with 503: under a burst the pool fills with orders waiting
//! on the row lock and browsing fails as well (the "white screen").
//!
//! Two stores behind [`MallStore`]: [`EmbeddedStore`] (no database: a
//! semaphore for the pool, a tokio mutex per row) and [`MySqlStore`] (a real
//! MySQL/MariaDB through `mysql_async`). [`Mall`] serves either over
//! HTTP/1.1. Dev-only: used by the `flash_sale` and `mall` examples and by
//! the tests, never by the gateway.

/// The embedded store: a semaphore pool and in-memory rows.
pub mod embedded;
/// The HTTP face of the mall and its counters.
pub mod http;
/// The MySQL/MariaDB store.
pub mod mysql;
/// The store trait and the values it deals in.
pub mod store;

pub use embedded::EmbeddedStore;
pub use http::{Mall, MallServer, MallStats};
pub use mysql::MySqlStore;
pub use store::{Books, Goods, MallConfig, MallStore, Order, OrderOutcome, StoreError};

/// The MySQL client the mall uses, so tests can read the database with the
/// same driver.
pub use mysql_async;
