pub mod bench;
pub mod common;
pub mod demo;
pub mod fetch;
pub mod generate;
pub mod ppl;
