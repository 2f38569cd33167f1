//! SMTP submission: the pre-auth front end (`front`), the backend login client (`back`), the
//! per-backend cache of EHLO extensions that keeps the advertised capabilities honest, and the
//! guard that keeps the client's XCLIENT and XFORWARD from the backend after login (`guard`).

pub mod back;
pub mod ehlo;
pub mod front;
pub mod guard;
