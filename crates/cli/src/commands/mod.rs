pub mod bench;
pub mod calibrate;
pub mod common;
pub mod compare;
pub mod demo;
pub mod fetch;
pub mod generate;
pub mod ppl;
