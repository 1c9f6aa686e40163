//! The one style of error page that proxy and agent write themselves: short, plain text,
//! the status and a reason a person can act on. Never a framework's default page.

/// The body of an error response.
pub fn error_page(status: u16, reason: &str) -> String {
    let title = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ if status >= 500 => "Server Error",
        _ => "Error",
    };
    format!("{status} {title}: {reason}\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn pages_say_status_and_reason() {
        assert_eq!(
            super::error_page(404, "no site is registered for x.example"),
            "404 Not Found: no site is registered for x.example\n"
        );
    }
}
