#!/usr/bin/env node
// The eventflow production stack. Environment-agnostic (no account, no
// region, no lookups), so `npx cdk synth` works offline; the account and
// region come from the credentials at `cdk deploy` time.
'use strict';

const cdk = require('aws-cdk-lib');
const { AwsSolutionsChecks } = require('cdk-nag');
const { EventflowStack } = require('../lib/eventflow-stack');

const app = new cdk.App();
// cdk-nag's AWS Solutions rules: a finding fails the synth unless it is
// acknowledged where the resource is made, with its reason (lib/suppress.js).
cdk.Validations.of(app).addPlugins(new AwsSolutionsChecks(app, { verbose: true }));
new EventflowStack(app, 'Eventflow', {
  description: 'eventflow: event ingest on ECS Fargate behind an ALB, NATS JetStream on three nodes, ADOT to AMP and X-Ray',
});
