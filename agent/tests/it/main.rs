//! Integration tests of the tablet agent: one binary, one module per area.

mod apply;
mod common;
mod freshness;
mod lookup;
mod plaintext;
