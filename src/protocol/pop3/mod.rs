//! POP3: the pre-auth front end (`front`) and the backend login client (`back`).

pub mod back;
pub mod front;
