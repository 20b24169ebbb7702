//! Where a request goes after an attempt in one IDC failed (DESIGN.md §5): spilled to the next
//! IDC (a read), replayed where a newer snapshot serves its shard (an idempotent request), or
//! answered with the error. Retries on other backends of the same pool are `forward`'s, under
//! the set's retry budget; this is the step across IDCs, decided once per failed attempt.

use crate::data::forward::ForwardError;

/// What the request has been through when an attempt fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The failed attempt gave the request back: nothing of it was sent, or it is idempotent
    /// and bodiless (`forward`'s rule). Without it there is nothing to send anywhere else.
    pub resendable: bool,
    /// Already spilled to another IDC (once at most).
    pub spilled: bool,
    /// Already replayed under a newer snapshot (once at most).
    pub moved: bool,
    /// GET, HEAD or OPTIONS: may be served by an IDC that is not the shard's owner.
    pub safe: bool,
    /// Safe, or PUT, DELETE, TRACE: may be sent again after it was (possibly) received.
    pub idempotent: bool,
}

/// The step after a failed attempt, carrying the target it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextHop<S, R> {
    /// Send the read to the next IDC of the shard's failover order.
    Spill(S),
    /// Send the request to the IDC a newer snapshot serves its shard from.
    Replay(R),
    /// Answer the client with this attempt's error.
    Stop,
}

/// The serving IDC could not be reached at all (no connection, no backend in service), or the
/// exchange broke before an answer (a read comes back from that resendable, being bodiless):
/// what lets a read spill. A timeout or a body past the route's limit does not.
pub fn unreachable(error: &ForwardError) -> bool {
    matches!(
        error,
        ForwardError::Connect(_) | ForwardError::NoneInService | ForwardError::Protocol(_)
    )
}

/// Decides the step after `error`. `spill_target` (the next active IDC with a backend in
/// service) and `moved_to` (where the newest snapshot serves the request, when that is another
/// IDC and a fresh request would be admitted there) are asked only when the rules allow that
/// step, in this order:
/// - nothing to resend: stop;
/// - reads spill, writes never do: a safe request whose first IDC was unreachable goes to the
///   next IDC, once, if there is one;
/// - otherwise an idempotent request not yet replayed goes where a newer snapshot moved its
///   shard (failover): the new owner is where a fresh request would go, so no second writer
///   appears;
/// - else stop.
pub fn next_hop<S, R>(
    error: &ForwardError,
    attempt: Attempt,
    spill_target: impl FnOnce() -> Option<S>,
    moved_to: impl FnOnce() -> Option<R>,
) -> NextHop<S, R> {
    if !attempt.resendable {
        return NextHop::Stop;
    }
    let may_spill = unreachable(error) && !attempt.spilled && !attempt.moved && attempt.safe;
    if let Some(target) = may_spill.then(spill_target).flatten() {
        return NextHop::Spill(target);
    }
    if !attempt.idempotent || attempt.moved {
        return NextHop::Stop;
    }
    match moved_to() {
        Some(target) => NextHop::Replay(target),
        None => NextHop::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: Attempt = Attempt {
        resendable: true,
        spilled: false,
        moved: false,
        safe: true,
        idempotent: true,
    };
    const PUT: Attempt = Attempt {
        safe: false,
        ..READ
    };
    const POST: Attempt = Attempt {
        safe: false,
        idempotent: false,
        ..READ
    };

    fn connect() -> ForwardError {
        ForwardError::Connect("refused".into())
    }

    /// `next_hop` with a spill target "next" and a newer owner "moved", both available.
    fn hop(error: &ForwardError, attempt: Attempt) -> NextHop<&'static str, &'static str> {
        next_hop(error, attempt, || Some("next"), || Some("moved"))
    }

    #[test]
    fn unreachable_means_no_connection_no_backend_or_a_broken_exchange() {
        assert!(unreachable(&connect()));
        assert!(unreachable(&ForwardError::NoneInService));
        assert!(unreachable(&ForwardError::Protocol("reset".into())));
        assert!(!unreachable(&ForwardError::Timeout));
        assert!(!unreachable(&ForwardError::BodyTooLarge(10)));
        assert!(!unreachable(&ForwardError::ClientBody("stalled".into())));
    }

    #[test]
    fn nothing_to_resend_stops_without_asking_for_targets() {
        let attempt = Attempt {
            resendable: false,
            ..READ
        };
        let hop: NextHop<(), ()> = next_hop(
            &connect(),
            attempt,
            || panic!("no spill target is needed"),
            || panic!("no newer owner is needed"),
        );
        assert_eq!(hop, NextHop::Stop);
    }

    #[test]
    fn an_unreachable_read_spills_once() {
        for error in [
            connect(),
            ForwardError::NoneInService,
            ForwardError::Protocol("reset".into()),
        ] {
            assert_eq!(hop(&error, READ), NextHop::Spill("next"), "{error}");
        }
        // Spilled already: a second failure may still be replayed where the shard moved.
        let spilled = Attempt {
            spilled: true,
            ..READ
        };
        assert_eq!(hop(&connect(), spilled), NextHop::Replay("moved"));
    }

    #[test]
    fn a_read_that_timed_out_or_overflowed_does_not_spill() {
        assert_eq!(hop(&ForwardError::Timeout, READ), NextHop::Replay("moved"));
        assert_eq!(
            hop(&ForwardError::BodyTooLarge(1), READ),
            NextHop::Replay("moved")
        );
    }

    #[test]
    fn writes_never_spill() {
        let spill_unused = || -> Option<&str> { panic!("a write has no spill target") };
        assert_eq!(
            next_hop(&connect(), PUT, spill_unused, || Some("moved")),
            NextHop::Replay("moved")
        );
        assert_eq!(
            next_hop(&connect(), POST, spill_unused, || Some("moved")),
            NextHop::<&str, &str>::Stop
        );
    }

    #[test]
    fn a_read_with_no_next_idc_is_replayed_or_stops() {
        let none = || None::<&str>;
        assert_eq!(
            next_hop(&connect(), READ, none, || Some("moved")),
            NextHop::Replay("moved")
        );
        assert_eq!(
            next_hop(&connect(), READ, none, none),
            NextHop::<&str, &str>::Stop
        );
    }

    #[test]
    fn only_idempotent_requests_are_replayed_and_only_once() {
        let moved_unused = || -> Option<&str> { panic!("not replayable") };
        assert_eq!(
            next_hop(&ForwardError::Timeout, POST, || None, moved_unused),
            NextHop::<&str, &str>::Stop
        );
        let moved = Attempt { moved: true, ..PUT };
        assert_eq!(
            next_hop(&connect(), moved, || None, moved_unused),
            NextHop::<&str, &str>::Stop
        );
        // A read replayed under a newer snapshot does not spill from there either.
        let moved_read = Attempt {
            moved: true,
            ..READ
        };
        assert_eq!(
            next_hop(
                &connect(),
                moved_read,
                || -> Option<&str> { panic!("no spill after a replay") },
                moved_unused
            ),
            NextHop::Stop
        );
    }

    #[test]
    fn an_idempotent_request_without_a_newer_owner_stops() {
        assert_eq!(
            next_hop(&ForwardError::Timeout, PUT, || None, || None::<&str>),
            NextHop::<&str, &str>::Stop
        );
    }
}
