//! The penalty box: after N rejections within W, a key is blocked for D.
//!
//! Applied per descriptor (all its limits at once) by the stores, around the limit
//! algorithms: a blocked key is answered over the limit without counting, and each
//! rejection of an unblocked key is counted in a fixed window of length W.

/// What a policy's `penalty:` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Penalty {
    pub after_rejections: u32,
    pub within_millis: u64,
    pub block_millis: u64,
}

/// A key's rejections in the current W window and the end of its block, if any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PenaltyState {
    pub window: u64,
    pub rejections: u32,
    pub blocked_until_millis: u64,
}

impl PenaltyState {
    /// Time left in the block at `now`, if the key is blocked.
    pub fn blocked_for(&self, now_millis: u64) -> Option<u64> {
        (self.blocked_until_millis > now_millis).then(|| self.blocked_until_millis - now_millis)
    }

    /// Counts one rejection; returns the block length when this one starts a block. The
    /// block lasts `block_millis`, or until the limit itself would let the key in
    /// (`limit_reset_millis`) if that is later: a blocked key counts nothing, so a client
    /// that came back when a shorter block ended would find its limit still over, be
    /// rejected again, and earn another block.
    pub fn record_rejection(
        &mut self,
        penalty: &Penalty,
        now_millis: u64,
        limit_reset_millis: u64,
    ) -> Option<u64> {
        let window = now_millis / penalty.within_millis.max(1);
        if window != self.window {
            self.window = window;
            self.rejections = 0;
        }
        self.rejections = self.rejections.saturating_add(1);
        if self.rejections >= penalty.after_rejections {
            self.rejections = 0;
            let block = penalty.block_millis.max(limit_reset_millis);
            self.blocked_until_millis = now_millis.saturating_add(block);
            return Some(block);
        }
        None
    }

    /// How long the state matters: until the block ends or the rejection window does.
    pub fn lifetime_millis(penalty: &Penalty) -> u64 {
        penalty.block_millis.max(penalty.within_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGIN: Penalty = Penalty {
        after_rejections: 3,
        within_millis: 60_000,
        block_millis: 300_000,
    };

    #[test]
    fn blocks_after_n_rejections_within_the_window_then_expires() {
        let mut state = PenaltyState::default();
        assert_eq!(state.record_rejection(&LOGIN, 1_000, 0), None);
        assert_eq!(state.record_rejection(&LOGIN, 2_000, 0), None);
        assert_eq!(state.record_rejection(&LOGIN, 3_000, 0), Some(300_000));
        assert_eq!(state.blocked_for(3_000), Some(300_000));
        assert_eq!(state.blocked_for(303_000 - 1), Some(1));
        assert_eq!(state.blocked_for(303_000), None);
    }

    #[test]
    fn a_block_lasts_until_the_limit_itself_lets_the_key_in_if_that_is_later() {
        let mut state = PenaltyState::default();
        state.record_rejection(&LOGIN, 1_000, 900_000);
        state.record_rejection(&LOGIN, 2_000, 900_000);
        assert_eq!(
            state.record_rejection(&LOGIN, 3_000, 900_000),
            Some(900_000)
        );
        assert_eq!(state.blocked_for(3_000), Some(900_000));
    }

    #[test]
    fn rejections_spread_over_windows_do_not_add_up() {
        let mut state = PenaltyState::default();
        state.record_rejection(&LOGIN, 59_000, 0);
        state.record_rejection(&LOGIN, 59_500, 0);
        assert_eq!(
            state.record_rejection(&LOGIN, 60_000, 0),
            None,
            "a new window starts over"
        );
    }
}
