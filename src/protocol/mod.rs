//! Protocol codecs and state machines. Nothing here owns a socket for longer than one phase.

pub mod imap;
pub mod sasl;
