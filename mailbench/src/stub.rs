//! `mailbench stub-backend`: the least an IMAP and a POP3 server can do for a proxy's login
//! (a greeting, OK to every login, a goodbye), in plaintext. `scripts/bench --backend stub` puts
//! it behind the proxies in place of Dovecot, whose own work per login (1 to 1.5 ms of CPU on the
//! reference machine, against 0.4 ms for a proxy) otherwise decides the login rate of every
//! proxy on a two-core machine. It accepts any user and password: it measures proxies, not
//! authentication.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Longest command line or literal a stub session accepts before it hangs up.
const MAX_LINE: usize = 64 * 1024;

const IMAP_CAPS: &str = "IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN";

#[derive(Clone, Copy)]
enum Protocol {
    Imap,
    Pop3,
}

/// Serve IMAP on `imap` and POP3 on `pop3` until stdin closes.
pub async fn serve(imap: &str, pop3: &str) -> Result<(), String> {
    let bind = |addr: &str| {
        let addr = addr.to_string();
        async move { TcpListener::bind(&addr).await.map_err(|e| format!("listen on {addr}: {e}")) }
    };
    let (imap, pop3) = (bind(imap).await?, bind(pop3).await?);
    println!("READY");
    tokio::spawn(accept_loop(imap, Protocol::Imap));
    tokio::spawn(accept_loop(pop3, Protocol::Pop3));
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    Ok(())
}

async fn accept_loop(listener: TcpListener, protocol: Protocol) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = match protocol {
                        Protocol::Imap => imap(tcp).await,
                        Protocol::Pop3 => pop3(tcp).await,
                    };
                });
            }
            // Out of descriptors or the like: back off instead of spinning.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

/// One line, CRLF included; `None` at end of stream or past `MAX_LINE`.
async fn read_line(r: &mut BufReader<TcpStream>, buf: &mut Vec<u8>) -> std::io::Result<Option<()>> {
    buf.clear();
    let n = (&mut *r).take(MAX_LINE as u64).read_until(b'\n', buf).await?;
    Ok((n > 0 && buf.ends_with(b"\n")).then_some(()))
}

/// A literal announced at the end of an IMAP line: `{N}` (the client waits for `+`) or `{N+}`.
fn literal(line: &[u8]) -> Option<(usize, bool)> {
    let t = line.strip_suffix(b"\r\n").or_else(|| line.strip_suffix(b"\n"))?;
    let t = t.strip_suffix(b"}")?;
    let open = t.iter().rposition(|&b| b == b'{')?;
    let (digits, sync) = match t[open + 1..].strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (&t[open + 1..], true),
    };
    let n = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((n, sync))
}

async fn imap(tcp: TcpStream) -> std::io::Result<()> {
    let mut c = BufReader::new(tcp);
    c.get_mut().write_all(format!("* OK [CAPABILITY {IMAP_CAPS}] stub ready.\r\n").as_bytes()).await?;
    let mut line = Vec::new();
    loop {
        if read_line(&mut c, &mut line).await?.is_none() {
            return Ok(());
        }
        // The tag and the command come first; what follows (strings, literals) only has to be
        // read to its end.
        let words: Vec<Vec<u8>> =
            line.split(|&b| b == b' ' || b == b'\r' || b == b'\n').take(2).map(<[u8]>::to_vec).collect();
        let mut tail = line.clone();
        while let Some((n, sync)) = literal(&tail) {
            if n > MAX_LINE {
                return Ok(());
            }
            if sync {
                c.get_mut().write_all(b"+ go ahead\r\n").await?;
            }
            let mut skip = vec![0; n];
            c.read_exact(&mut skip).await?;
            if read_line(&mut c, &mut tail).await?.is_none() {
                return Ok(());
            }
        }
        let (tag, cmd) = match words.as_slice() {
            [tag, cmd, ..] => (String::from_utf8_lossy(tag).into_owned(), cmd.to_ascii_uppercase()),
            _ => {
                c.get_mut().write_all(b"* BAD no command\r\n").await?;
                continue;
            }
        };
        let reply = match cmd.as_slice() {
            b"LOGOUT" => {
                c.get_mut()
                    .write_all(format!("* BYE stub logging out\r\n{tag} OK Logout completed.\r\n").as_bytes())
                    .await?;
                return c.get_mut().shutdown().await;
            }
            b"CAPABILITY" => format!("* CAPABILITY {IMAP_CAPS}\r\n{tag} OK Capability completed.\r\n"),
            b"ID" => format!("* ID NIL\r\n{tag} OK ID completed.\r\n"),
            b"AUTHENTICATE" if !has_initial_response(&line) => {
                c.get_mut().write_all(b"+ \r\n").await?;
                if read_line(&mut c, &mut tail).await?.is_none() {
                    return Ok(());
                }
                format!("{tag} OK Logged in.\r\n")
            }
            b"LOGIN" | b"AUTHENTICATE" => format!("{tag} OK [CAPABILITY {IMAP_CAPS}] Logged in.\r\n"),
            _ => format!("{tag} OK done.\r\n"),
        };
        c.get_mut().write_all(reply.as_bytes()).await?;
    }
}

/// `tag AUTHENTICATE PLAIN <initial response>`: more than three words.
fn has_initial_response(line: &[u8]) -> bool {
    line.split(|&b| b == b' ').filter(|w| !w.trim_ascii().is_empty()).count() > 3
}

async fn pop3(tcp: TcpStream) -> std::io::Result<()> {
    let mut c = BufReader::new(tcp);
    c.get_mut().write_all(b"+OK stub ready.\r\n").await?;
    let mut line = Vec::new();
    loop {
        if read_line(&mut c, &mut line).await?.is_none() {
            return Ok(());
        }
        let cmd =
            line.split(|&b| b == b' ' || b == b'\r' || b == b'\n').next().unwrap_or_default().to_ascii_uppercase();
        let reply: &[u8] = match cmd.as_slice() {
            b"QUIT" => {
                c.get_mut().write_all(b"+OK Logging out.\r\n").await?;
                return c.get_mut().shutdown().await;
            }
            b"CAPA" => b"+OK\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\n.\r\n",
            b"STAT" => b"+OK 0 0\r\n",
            // `AUTH PLAIN` without an initial response: the response comes on the next line.
            b"AUTH" if line.split(|&b| b == b' ').count() == 2 => {
                c.get_mut().write_all(b"+ \r\n").await?;
                if read_line(&mut c, &mut line).await?.is_none() {
                    return Ok(());
                }
                b"+OK Logged in.\r\n"
            }
            b"PASS" | b"AUTH" => b"+OK Logged in.\r\n",
            _ => b"+OK\r\n",
        };
        c.get_mut().write_all(reply).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_found_at_the_end_of_a_line() {
        assert_eq!(literal(b"1 LOGIN {5}\r\n"), Some((5, true)));
        assert_eq!(literal(b"1 LOGIN {12+}\r\n"), Some((12, false)));
        assert_eq!(literal(b"1 LOGIN \"u\" \"p\"\r\n"), None);
        assert_eq!(literal(b"1 LOGIN {x}\r\n"), None);
        assert!(has_initial_response(b"a AUTHENTICATE PLAIN AGEAYg==\r\n"));
        assert!(!has_initial_response(b"a AUTHENTICATE PLAIN\r\n"));
    }

    /// A client connected to a stub serving `protocol` on a fresh loopback port.
    async fn connected(protocol: Protocol) -> BufReader<TcpStream> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(accept_loop(listener, protocol));
        BufReader::new(TcpStream::connect(addr).await.unwrap())
    }

    /// What nginx's mail proxy sends: the user and the password as synchronizing literals.
    #[tokio::test]
    async fn imap_login_with_literals_then_logout() {
        let mut c = connected(Protocol::Imap).await;
        let mut l = Vec::new();
        let next = async |c: &mut BufReader<TcpStream>, l: &mut Vec<u8>| {
            read_line(c, l).await.unwrap().unwrap();
            String::from_utf8(l.clone()).unwrap()
        };
        assert!(next(&mut c, &mut l).await.starts_with("* OK [CAPABILITY IMAP4rev1"));
        c.get_mut().write_all(b"1 LOGIN {5}\r\n").await.unwrap();
        assert!(next(&mut c, &mut l).await.starts_with("+ "));
        c.get_mut().write_all(b"alice {2}\r\n").await.unwrap();
        assert!(next(&mut c, &mut l).await.starts_with("+ "));
        c.get_mut().write_all(b"pw\r\n2 LOGOUT\r\n").await.unwrap();
        assert!(next(&mut c, &mut l).await.starts_with("1 OK "));
        assert!(next(&mut c, &mut l).await.starts_with("* BYE"));
        assert!(next(&mut c, &mut l).await.starts_with("2 OK "));
        assert!(read_line(&mut c, &mut l).await.unwrap().is_none(), "closed after LOGOUT");
    }

    #[tokio::test]
    async fn pop3_user_pass_quit() {
        let mut c = connected(Protocol::Pop3).await;
        let mut l = Vec::new();
        c.get_mut().write_all(b"USER alice\r\nPASS pw\r\nQUIT\r\n").await.unwrap();
        for want in ["+OK stub", "+OK\r", "+OK Logged in", "+OK Logging out"] {
            read_line(&mut c, &mut l).await.unwrap().unwrap();
            assert!(l.starts_with(want.as_bytes()), "{want}: {}", String::from_utf8_lossy(&l));
        }
        assert!(read_line(&mut c, &mut l).await.unwrap().is_none());
    }
}
