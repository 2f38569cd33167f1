//! SMTP submission: the pre-auth front end (`front`), the backend login client (`back`), and
//! the per-backend cache of EHLO extensions that keeps the advertised capabilities honest.

pub mod back;
pub mod ehlo;
pub mod front;
