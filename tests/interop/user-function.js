// The interoperability suite's user function, written on the real CloudState JavaScript
// support library (../shared/interop/, unpacked by the tests into target/interop/). It is what
// a latticed user looks like: nothing here knows about latticed.
//
//   CLOUDSTATE_NODE_SUPPORT=/abs/node-support PORT=0 [SERVE=GCounters,...] node user-function.js
//
// SERVE names the entities (services of interop/crdts.proto without the package) to serve; all
// of them without it. The forwards and side effects of GCounters target PNCounters, which
// another user function may serve.
//
// The working directory must hold `user-function.desc` (compiled from protos/ with the
// library's bin/compile-descriptor.js). Prints `gRPC server started on HOST:PORT` once bound.

const path = require("path");
const lib = process.env.CLOUDSTATE_NODE_SUPPORT;
if (!lib) {
  console.error("CLOUDSTATE_NODE_SUPPORT must name the unpacked node-support folder");
  process.exit(2);
}
const cloudstate = require(lib);
const crdt = cloudstate.crdt;

const protos = path.join(__dirname, "protos");
const file = "interop/crdts.proto";
const includeDirs = [protos, path.join(lib, "proto")];

function entity(service, defaultValue, options = {}) {
  const e = new crdt.Crdt(file, "interop." + service, { includeDirs, ...options });
  e.defaultValue = defaultValue;
  e.interopName = service;
  return e;
}

const sorted = (set) => {
  const out = [];
  set.forEach((v) => out.push(v));
  return out.sort();
};

// streamed watch: replies with the current value, then with every change; with
// `bumpOnCancel` the cancel callback increments the counter
function watch(view) {
  return (cmd, ctx) => {
    if (ctx.streamed) {
      ctx.onStateChange = (state) => view(state);
      const bump = Number(cmd.bumpOnCancel || 0);
      if (bump > 0) {
        ctx.onStreamCancel = (state) => state.increment(bump);
      }
    }
    return view(ctx.state);
  };
}

const counterValue = (state) => ({ value: state.value });

const gcounters = entity("GCounters", () => new crdt.GCounter());
const pncounters = entity("PNCounters", () => new crdt.PNCounter());
const pnChange = pncounters.service.methods.Change;
const gIncrement = gcounters.service.methods.Increment;
gcounters.commandHandlers = {
  Increment: (cmd, ctx) => {
    ctx.state.increment(cmd.amount);
    return counterValue(ctx.state);
  },
  Get: (cmd, ctx) => counterValue(ctx.state),
  Watch: watch(counterValue),
  Delete: (cmd, ctx) => {
    ctx.delete();
    return {};
  },
  IncrementWithEffect: (cmd, ctx) => {
    ctx.state.increment(cmd.amount);
    ctx.effect(pnChange, { id: cmd.targetId, amount: cmd.amount }, cmd.synchronous);
    return counterValue(ctx.state);
  },
  ForwardToPn: (cmd, ctx) => {
    ctx.thenForward(pnChange, { id: cmd.targetId, amount: cmd.amount });
  },
  EffectOnSelf: (cmd, ctx) => {
    ctx.state.increment(cmd.amount);
    ctx.effect(gIncrement, { id: cmd.id, amount: cmd.amount }, true);
    return counterValue(ctx.state);
  },
  Fail: (cmd, ctx) => ctx.fail("refused by the user function"),
};

pncounters.commandHandlers = {
  Change: (cmd, ctx) => {
    ctx.state.increment(cmd.amount);
    return counterValue(ctx.state);
  },
  Get: (cmd, ctx) => counterValue(ctx.state),
};

const gsets = entity("GSets", () => new crdt.GSet());
gsets.commandHandlers = {
  Add: (cmd, ctx) => {
    ctx.state.add(cmd.value);
    return { values: sorted(ctx.state) };
  },
  Get: (cmd, ctx) => ({ values: sorted(ctx.state) }),
};

const orsets = entity("ORSets", () => new crdt.ORSet());
orsets.commandHandlers = {
  Add: (cmd, ctx) => {
    ctx.state.add(cmd.value);
    return { values: sorted(ctx.state) };
  },
  Remove: (cmd, ctx) => {
    ctx.state.delete(cmd.value);
    return { values: sorted(ctx.state) };
  },
  Replace: (cmd, ctx) => {
    ctx.state.clear();
    cmd.values.forEach((v) => ctx.state.add(v));
    return { values: sorted(ctx.state) };
  },
  Get: (cmd, ctx) => ({ values: sorted(ctx.state) }),
};

const registers = entity("Registers", () => new crdt.LWWRegister(""));
registers.commandHandlers = {
  Set: (cmd, ctx) => {
    ctx.state.value = cmd.value;
    return { value: ctx.state.value };
  },
  Get: (cmd, ctx) => ({ value: ctx.state.value }),
};

const flags = entity("Flags", () => new crdt.Flag());
flags.commandHandlers = {
  Enable: (cmd, ctx) => {
    ctx.state.enable();
    return { value: ctx.state.value };
  },
  Get: (cmd, ctx) => ({ value: ctx.state.value }),
};

const mapValue = (state) => {
  const entries = [];
  state.forEach((value, key) => entries.push({ key: key, value: value.value }));
  entries.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  return { entries };
};
const maps = entity("Maps", () => new crdt.ORMap());
maps.commandHandlers = {
  Add: (cmd, ctx) => {
    let counter = ctx.state.get(cmd.key);
    if (counter === undefined) {
      counter = new crdt.GCounter();
      ctx.state.set(cmd.key, counter);
    }
    counter.increment(cmd.amount);
    return mapValue(ctx.state);
  },
  Remove: (cmd, ctx) => {
    ctx.state.delete(cmd.key);
    return mapValue(ctx.state);
  },
  Get: (cmd, ctx) => mapValue(ctx.state),
};

const voteValue = (state) => ({
  selfVote: state.vote,
  votesFor: state.votesFor,
  totalVoters: state.totalVoters,
});
const votes = entity("Votes", () => new crdt.Vote());
votes.commandHandlers = {
  Cast: (cmd, ctx) => {
    ctx.state.vote = cmd.vote;
    return voteValue(ctx.state);
  },
  Get: (cmd, ctx) => voteValue(ctx.state),
  Watch: (cmd, ctx) => {
    if (ctx.streamed) {
      ctx.onStateChange = (state) => voteValue(state);
    }
    return voteValue(ctx.state);
  },
};

const passivating = entity("Passivating", () => new crdt.GCounter(), {
  passivationTimeoutMillis: 300,
});
passivating.commandHandlers = {
  Increment: gcounters.commandHandlers.Increment,
  Get: gcounters.commandHandlers.Get,
};

const server = new cloudstate.CloudState({ serviceName: "latticed-interop", serviceVersion: "1" });
const only = (process.env.SERVE || "").split(",").filter((s) => s);
[gcounters, pncounters, gsets, orsets, registers, flags, maps, votes, passivating]
  .filter((e) => only.length === 0 || only.includes(e.interopName))
  .forEach((e) => server.addEntity(e));
server.start({
  bindAddress: process.env.HOST || "127.0.0.1",
  bindPort: parseInt(process.env.PORT || "8080", 10),
});
