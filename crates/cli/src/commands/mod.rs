pub mod bench;
pub mod calibrate;
pub mod common;
pub mod demo;
pub mod fetch;
pub mod generate;
pub mod ppl;
