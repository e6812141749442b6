//! Server benchmark (filled in below).
fn main() {}
