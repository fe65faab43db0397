//! The Mattermost simulator (being written).
