//! Configuration: the file format (`file`), the validated model (`model`) and the reload
//! watcher (`watch`).

pub mod file;
pub mod model;
pub mod watch;

pub use model::*;
