//! ccpl-candle's tests, one binary (`cargo test -p ccpl-candle --test candle`): each file here is
//! a module named after it (`cuda` only with the `cuda` feature), so
//! `cargo test -p ccpl-candle --test candle reference::` runs one of them.

#[macro_use]
mod common;

mod cuda;
mod gradients;
mod reference;
