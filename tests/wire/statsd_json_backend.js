// A backend for Etsy's statsd daemon (tests/common/statsd.rs starts it): after every
// flush, appends one JSON line to the file named by the config's `jsonLinesFile` with the
// flush's counters and, for each timer, how many calls statsd counted for it (sample
// rates included), so a Rust test can read what a real statsd made of meshlimit's lines.
"use strict";
const fs = require("fs");

exports.init = function (startupTime, config, events) {
  events.on("flush", function (timestamp, metrics) {
    const timerCounts = {};
    for (const [name, data] of Object.entries(metrics.timer_data)) {
      timerCounts[name] = data.count;
    }
    const line = { counters: metrics.counters, timer_counts: timerCounts };
    fs.appendFileSync(config.jsonLinesFile, JSON.stringify(line) + "\n");
  });
  return true;
};
