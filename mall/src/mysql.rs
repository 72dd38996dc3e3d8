//! The MySQL/MariaDB store: a real `mysql_async` pool of
//! [`MallConfig::pool`] connections (a request waits at most `pool_wait`
//! for one), a real transaction per order (`SELECT ... FOR UPDATE` on the
//! stock row, `UPDATE ... WHERE stock > 0`, `INSERT` under
//! `UNIQUE(ticket)` and `UNIQUE(user_id, sku)`), so a redelivered ticket is
//! answered with its first order and never makes a second row. The schema
//! (and the database, when the URL names one that does not exist) is
//! created on connect.

use std::time::Duration;

use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, TxOpts};

use crate::store::{
    Books, Goods, InUse, InUseGuard, MallConfig, MallStore, Order, OrderOutcome, StoreError,
};

/// MySQL's ER_DUP_ENTRY: a unique key refused the row.
const ER_DUP_ENTRY: u16 = 1062;
/// MySQL's ER_BAD_DB_ERROR: the URL's database does not exist.
const ER_BAD_DB_ERROR: u16 = 1049;
/// How long admin work (schema, reset, books) waits for a connection: it
/// is not part of the sale, so it is not refused like a buyer.
const ADMIN_WAIT: Duration = Duration::from_secs(30);

/// The schema, created when missing. `stock` is unsigned so the database
/// itself refuses to go below zero; `ticket` is NULL for orders that did not
/// come through Sluice (a unique key allows many NULLs).
const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS goods (
        sku VARCHAR(64) NOT NULL PRIMARY KEY,
        name VARCHAR(128) NOT NULL,
        price_cents INT UNSIGNED NOT NULL,
        stock INT UNSIGNED NOT NULL
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS orders (
        id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
        sku VARCHAR(64) NOT NULL,
        user_id VARCHAR(128) NOT NULL,
        ticket VARCHAR(64) NULL,
        created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
        UNIQUE KEY uniq_ticket (ticket),
        UNIQUE KEY uniq_user_sku (user_id, sku)
    ) ENGINE=InnoDB",
];

/// The MySQL/MariaDB store.
pub struct MySqlStore {
    /// Pool size, wait and row-lock hold.
    config: MallConfig,
    /// The connection pool.
    pool: Pool,
    /// Connections held now.
    in_use: InUse,
    /// `host:port/db`, for reports (no credentials).
    location: String,
}

/// A pool connection and its count.
struct Held {
    conn: Conn,
    _counted: InUseGuard,
}

fn db(e: mysql_async::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

fn server_code(e: &mysql_async::Error) -> Option<u16> {
    match e {
        mysql_async::Error::Server(s) => Some(s.code),
        _ => None,
    }
}

impl MySqlStore {
    /// Connects to `url` (`mysql://user[:pass]@host:port/db`, no TLS) with a
    /// pool of `config.pool`, creating the database and the schema when
    /// missing.
    pub async fn connect(url: &str, config: MallConfig) -> Result<Self, StoreError> {
        let opts = Opts::from_url(url).map_err(|e| StoreError::Db(format!("{url}: {e}")))?;
        let constraints = PoolConstraints::new(0, config.pool.max(1))
            .ok_or_else(|| StoreError::Db(format!("bad pool size {}", config.pool)))?;
        let location = format!(
            "{}:{}/{}",
            opts.ip_or_hostname(),
            opts.tcp_port(),
            opts.db_name().unwrap_or("")
        );
        let builder = OptsBuilder::from_opts(opts.clone())
            .pool_opts(PoolOpts::default().with_constraints(constraints));
        let store = Self {
            config,
            pool: Pool::new(builder),
            in_use: InUse::default(),
            location,
        };
        match store.create_schema().await {
            Err(e) if server_code(&e) == Some(ER_BAD_DB_ERROR) => {
                create_database(&opts).await?;
                store.create_schema().await.map_err(db)?;
            }
            other => other.map_err(db)?,
        }
        Ok(store)
    }

    /// The pool, for callers that read the database themselves.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn create_schema(&self) -> Result<(), mysql_async::Error> {
        let mut conn = self.pool.get_conn().await?;
        for statement in SCHEMA {
            conn.query_drop(statement).await?;
        }
        Ok(())
    }

    /// Waits up to `wait` for a connection.
    async fn connection(&self, wait: Duration) -> Result<Held, StoreError> {
        // A dropped `get_conn` leaves the pool's wait list (mysql_async
        // unqueues it), so timing out here leaks nothing.
        match tokio::time::timeout(wait, self.pool.get_conn()).await {
            Ok(Ok(conn)) => Ok(Held {
                conn,
                _counted: self.in_use.hold(),
            }),
            Ok(Err(e)) => Err(db(e)),
            Err(_) => Err(StoreError::Busy {
                wait,
                pool: self.config.pool,
            }),
        }
    }

    async fn find_by_ticket<Q: Queryable>(
        q: &mut Q,
        ticket: &str,
    ) -> Result<Option<Order>, mysql_async::Error> {
        let row: Option<(u64, String, String, Option<String>)> = q
            .exec_first(
                "SELECT id, sku, user_id, ticket FROM orders WHERE ticket = ?",
                (ticket,),
            )
            .await?;
        Ok(row.map(|(id, sku, user, ticket)| Order {
            id,
            sku,
            user,
            ticket,
        }))
    }

    async fn try_order(
        &self,
        conn: &mut Conn,
        sku: &str,
        user: &str,
        ticket: Option<&str>,
    ) -> Result<OrderOutcome, mysql_async::Error> {
        let mut tx = conn.start_transaction(TxOpts::default()).await?;
        let row: Option<u64> = tx
            .exec_first("SELECT stock FROM goods WHERE sku = ? FOR UPDATE", (sku,))
            .await?;
        if row.is_none() {
            tx.rollback().await?;
            return Ok(OrderOutcome::NoSuchGoods);
        }
        tokio::time::sleep(self.config.row_lock_hold).await;
        // Under the row lock every order of this sku is serialised, so this
        // read sees any earlier delivery of the ticket; UNIQUE(ticket)
        // stays the guarantee for the rest.
        if let Some(t) = ticket {
            if let Some(first) = Self::find_by_ticket(&mut tx, t).await? {
                tx.rollback().await?;
                return Ok(OrderOutcome::Replayed(first));
            }
        }
        tx.exec_drop(
            "UPDATE goods SET stock = stock - 1 WHERE sku = ? AND stock > 0",
            (sku,),
        )
        .await?;
        if tx.affected_rows() == 0 {
            tx.rollback().await?;
            return Ok(OrderOutcome::SoldOut);
        }
        let inserted = tx
            .exec_drop(
                "INSERT INTO orders (sku, user_id, ticket) VALUES (?, ?, ?)",
                (sku, user, ticket),
            )
            .await;
        match inserted {
            Ok(()) => {
                let id = tx.last_insert_id().unwrap_or(0);
                tx.commit().await?;
                Ok(OrderOutcome::Placed(Order {
                    id,
                    sku: sku.to_string(),
                    user: user.to_string(),
                    ticket: ticket.map(str::to_string),
                }))
            }
            Err(e) if server_code(&e) == Some(ER_DUP_ENTRY) => {
                // The unit goes back with the rollback.
                tx.rollback().await?;
                if let Some(t) = ticket {
                    if let Some(first) = Self::find_by_ticket(conn, t).await? {
                        return Ok(OrderOutcome::Replayed(first));
                    }
                }
                Ok(OrderOutcome::AlreadyBought)
            }
            Err(e) => Err(e),
        }
    }
}

/// Connects without a database and creates the one `opts` names.
async fn create_database(opts: &Opts) -> Result<(), StoreError> {
    let Some(name) = opts.db_name() else {
        return Err(StoreError::Db("the URL names no database".into()));
    };
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(StoreError::Db(format!(
            "database {name:?} does not exist; create it (only [A-Za-z0-9_] names are created here)"
        )));
    }
    let bare = OptsBuilder::from_opts(opts.clone()).db_name(None::<String>);
    let mut conn = Conn::new(bare).await.map_err(db)?;
    conn.query_drop(format!("CREATE DATABASE IF NOT EXISTS `{name}`"))
        .await
        .map_err(db)?;
    conn.disconnect().await.map_err(db)
}

#[async_trait]
impl MallStore for MySqlStore {
    async fn order(
        &self,
        sku: &str,
        user: &str,
        ticket: Option<&str>,
    ) -> Result<OrderOutcome, StoreError> {
        let mut held = self.connection(self.config.pool_wait).await?;
        self.try_order(&mut held.conn, sku, user, ticket)
            .await
            .map_err(db)
    }

    async fn page(&self, sku: &str) -> Result<Option<Goods>, StoreError> {
        let mut held = self.connection(self.config.pool_wait).await?;
        let row: Option<(String, String, u64, u64)> = held
            .conn
            .exec_first(
                "SELECT sku, name, price_cents, stock FROM goods WHERE sku = ?",
                (sku,),
            )
            .await
            .map_err(db)?;
        Ok(row.map(|(sku, name, price_cents, stock)| Goods {
            sku,
            name,
            price_cents,
            stock,
        }))
    }

    async fn reset(&self, sku: &str, stock: u64) -> Result<(), StoreError> {
        let mut held = self.connection(ADMIN_WAIT).await?;
        let mut tx = held
            .conn
            .start_transaction(TxOpts::default())
            .await
            .map_err(db)?;
        tx.exec_drop(
            "INSERT INTO goods (sku, name, price_cents, stock) VALUES (?, ?, 99900, ?) \
             ON DUPLICATE KEY UPDATE stock = VALUES(stock)",
            (sku, format!("{sku} (flash sale)"), stock),
        )
        .await
        .map_err(db)?;
        tx.exec_drop("DELETE FROM orders WHERE sku = ?", (sku,))
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn books(&self, sku: &str) -> Result<Books, StoreError> {
        let mut held = self.connection(ADMIN_WAIT).await?;
        let stock: Option<u64> = held
            .conn
            .exec_first("SELECT stock FROM goods WHERE sku = ?", (sku,))
            .await
            .map_err(db)?;
        let rows: Vec<(u64, String, String, Option<String>)> = held
            .conn
            .exec(
                "SELECT id, sku, user_id, ticket FROM orders WHERE sku = ? ORDER BY id",
                (sku,),
            )
            .await
            .map_err(db)?;
        Ok(Books {
            stock: stock.unwrap_or(0),
            orders: rows
                .into_iter()
                .map(|(id, sku, user, ticket)| Order {
                    id,
                    sku,
                    user,
                    ticket,
                })
                .collect(),
        })
    }

    fn pool_in_use(&self) -> usize {
        self.in_use.get()
    }

    fn pool_size(&self) -> usize {
        self.config.pool
    }

    fn describe(&self) -> String {
        format!(
            "MySQL at {}, pool of {} (wait {:?}), row lock held {:?} per order",
            self.location, self.config.pool, self.config.pool_wait, self.config.row_lock_hold
        )
    }
}
