//! POP3: the pre-auth front end (`front`), the backend login client (`back`), and the responses
//! the relay follows after login (`responses`).

pub mod back;
pub mod front;
pub mod responses;
