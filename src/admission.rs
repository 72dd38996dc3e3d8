//! The admission pipeline for requests that match a flash-sale rule
//! (DESIGN.md section 3): extract, window, rate limits, sold-out flag,
//! dedup, stock pre-deduction, then forward. Each stage can end the
//! request with an [`Answer`](crate::outcome::Answer).

pub mod extract;
pub mod ratelimit;
